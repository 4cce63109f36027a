"""Text to token ids and back for the scheduler's frontend, and streaming detokenization.

Built on the `tokenizers` library alone: the scheduler never imports torch or transformers.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import tokenizers

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for the bytes of an incomplete character
# Prompt tokens decoded ahead of the output: some decoders (SentencePiece's) drop the leading
# space of a text's first word, which the output's first word must keep.
PROMPT_CONTEXT_TOKENS = 5


class Tokenizer:
    """The tokenizer of an HF model directory, encoding and decoding as transformers' AutoTokenizer.

    ``eos_token_ids``: the token ids that end a generation.
    ``all_special_ids``: the token ids that ``decode(..., skip_special_tokens=True)`` leaves out.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token_ids: set[int]):
        self._tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        added = tokenizer.get_added_tokens_decoder().items()
        self.all_special_ids = sorted(id_ for id_, token in added if token.special)
        # (token id, skip_special_tokens) -> that one token's text: streaming decodes each
        # new token alone once it is out (IncrementalDetokenizer._emit). At most 2 x vocab.
        self._one_token: dict[tuple[int, bool], str] = {}

    @classmethod
    def from_model_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` of the model directory ``path``.

        The EOS ids are the union of ``eos_token_id`` in generation_config.json and config.json
        (an int or a list) and the ``eos_token`` of tokenizer_config.json; a missing file adds none.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in model directory {path}: pass an HF model directory "
                "(`pagedserve prepare-model` writes the default one)"
            )
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        eos_token = _token_content(_read_json(path / "tokenizer_config.json").get("eos_token"))
        eos_ids = _as_ids(tokenizer.token_to_id(eos_token) if eos_token else None)
        for name in ("generation_config.json", "config.json"):
            eos_ids |= _as_ids(_read_json(path / name).get("eos_token_id"))
        return cls(tokenizer, eos_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the special tokens the tokenizer's post-processor adds
        unless ``add_special_tokens`` is false (a rendered chat template holds its own)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; bytes of an incomplete character come out as U+FFFD."""
        if len(token_ids) == 1:
            key = (token_ids[0], skip_special_tokens)
            text = self._one_token.get(key)
            if text is None:
                text = self._one_token[key] = self._tokenizer.decode(
                    [token_ids[0]], skip_special_tokens=skip_special_tokens)
            return text
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, special tokens included (vLLM's ``decoded_token``); a byte
        token that is part of a character comes out as U+FFFD."""
        return self._tokenizer.decode_batch([[t] for t in token_ids], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Turns the token ids of one output, as they are generated, into text deltas.

    Only a small window of ids is decoded per step (vLLM's prefix/read offsets):
    ``_ids[:_read]`` is context whose text, ``_prefix_text``, was already emitted (or belongs to
    the prompt), ``_ids[_read:]`` are ids whose text is not out yet. Text ending in an incomplete
    multi-byte character is held back until a later token completes it.

    Ids whose text nobody reads until the output ends (a request that neither streams nor
    has stop strings) are deferred instead (``defer``): decoded all at once when the text is
    wanted, one window for the whole output instead of one per id.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[max(len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS, 0):])
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._deltas: list[str] = []
        self._deferred: list[int] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._deltas)

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete ("" while a character is incomplete)."""
        self._ids.extend(new_token_ids)
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def defer(self, new_token_ids: Sequence[int]) -> None:
        """Add generated ids without decoding them: their text comes out of ``catch_up``
        or ``flush``."""
        self._deferred.extend(new_token_ids)

    def catch_up(self) -> str:
        """The text the deferred ids complete, the same as ``step`` would have emitted id by
        id: one decode, unless the text ends inside a character (then id by id)."""
        if not self._deferred:
            return ""
        deferred, self._deferred = self._deferred, []
        delta = self.step(deferred)
        if delta or len(deferred) == 1:
            return delta
        # Held back as a whole (or only skipped special tokens): step took the ids and
        # changed nothing else; id by id, the text before a cut character comes out.
        del self._ids[len(self._ids) - len(deferred):]
        return "".join(self.step([token_id]) for token_id in deferred)

    def flush(self) -> str:
        """Return whatever text is held back, U+FFFD included: call it when the output ends."""
        self._ids.extend(self._deferred)
        self._deferred = []
        return self._emit(self._decode(self._ids))

    def fork(self) -> IncrementalDetokenizer:
        """An independent copy at this point, for a forked sequence (parallel sampling, beams)."""
        child = copy.copy(self)
        child._ids, child._deltas = list(self._ids), list(self._deltas)
        child._deferred = list(self._deferred)
        return child

    def _emit(self, text: str) -> str:
        delta = _text_after(self._prefix_text, text)
        if not delta:
            return ""  # e.g. only skipped special tokens so far
        # The ids just emitted become the context of the next window.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._deltas.append(delta)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, self.skip_special_tokens)


def _text_after(prefix_text: str, text: str) -> str:
    """What ``text`` adds to ``prefix_text``, the text of its leading ids. A U+FFFD ending the
    prefix may stand for the bytes of a character cut short (a token-id prompt can end inside
    one): when ``text`` completes that character, the character is new text."""
    if text.startswith(prefix_text) and not prefix_text.endswith(REPLACEMENT_CHAR):
        return text[len(prefix_text):]  # the usual case, without a loop over characters
    start = len(prefix_text.rstrip(REPLACEMENT_CHAR))
    while start < min(len(prefix_text), len(text)) and text[start] == prefix_text[start]:
        start += 1
    return text[start:]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _token_content(token: str | dict | None) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token
