"""A token-id prompt may end inside a multi-byte character: the output's first tokens complete
it, and the completed character is output text (the prompt's text can only show U+FFFD)."""
from __future__ import annotations

import pytest

from pagedserve.scheduler_svc.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer

TEXTS = ["Hi 🎉 ok", "日本語のテキストと中文文本", "emoji 👍🏽 family 👨‍👩‍👧 done",
         "Ærøskøbing ☃ snow", "한국어 텍스트"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(smollm2_dir)


def _stream(tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    return "".join(detokenizer.step([i]) for i in output_ids) + detokenizer.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_text_and_output_text_make_the_whole_text_at_every_cut(tokenizer, text):
    ids = tokenizer.encode(text)
    cuts_inside_a_character = 0
    for cut in range(1, len(ids)):
        prompt_text = tokenizer.decode(ids[:cut])
        complete = prompt_text.rstrip(REPLACEMENT_CHAR)
        cuts_inside_a_character += complete != prompt_text
        assert complete + _stream(tokenizer, ids[:cut], ids[cut:]) == text, cut
    assert cuts_inside_a_character  # the case this is about occurs in every text here


def test_a_real_replacement_character_ending_the_prompt_stays_in_the_prompt(tokenizer):
    ids = tokenizer.encode("x \ufffd y")
    cut = next(c for c in range(len(ids)) if tokenizer.decode(ids[:c]) == "x \ufffd")
    assert _stream(tokenizer, ids[:cut], ids[cut:]) == " y"


def test_output_ending_inside_a_character_flushes_its_replacement(tokenizer):
    ids = tokenizer.encode("Hi 🎉")
    assert _stream(tokenizer, ids[:1], ids[1:-1]) == " " + REPLACEMENT_CHAR
