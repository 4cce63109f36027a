"""Logprobs in each endpoint's OpenAI shape, from the client's per-token
``{token_id: Logprob(logprob, rank, decoded_token)}``: the sampled token, then the top-N.

Logprobs are floored at ``FLOOR``, as vLLM does: JSON has no ``-inf``.
"""
from __future__ import annotations

FLOOR = -9999.0


def completion_logprobs(token_ids: list[int], steps: list[dict | None] | None, offset: int,
                        first_text: str = "") -> dict:
    """``/v1/completions``: parallel lists of the tokens, their logprobs, each position's
    top tokens (the token itself among them) and text offsets from ``offset``. A ``None``
    step is a prompt's first token, which nothing predicts: its text is ``first_text``
    and its logprobs ``None``, as vLLM's."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, step in zip(token_ids, steps or []):
        chosen = None if step is None else step[token_id]
        tokens.append(first_text if chosen is None else chosen.decoded_token)
        token_logprobs.append(None if chosen is None else _floored(chosen.logprob))
        top.append(None if step is None else {lp.decoded_token: _floored(lp.logprob)
                                              for lp in _by_rank(step)})
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def echoed_logprobs(prompt: str, token_ids: list[int], steps: list[dict | None],
                    output: dict) -> dict:
    """``output``'s completion logprobs after the prompt's (``echo``). The prompt's first
    token, which its logprobs do not name, is the text the others leave of ``prompt``."""
    rest = "".join(step[t].decoded_token for t, step in zip(token_ids[1:], steps[1:]))
    first = prompt[:len(prompt) - len(rest)] if prompt.endswith(rest) else ""
    echoed = completion_logprobs(token_ids, steps, 0, first)
    return {key: echoed[key] + output[key] for key in echoed}


def chat_logprobs(token_ids: list[int], steps: list[dict] | None, top_n: int) -> dict:
    """``/v1/chat/completions``: per sampled token its text, logprob, UTF-8 bytes and the
    ``top_n`` most likely tokens."""
    return {"content": [
        {**_entry(step[token_id]),
         "top_logprobs": [_entry(lp) for lp in _by_rank(step)[:top_n]]}
        for token_id, step in zip(token_ids, steps or [])]}


def _entry(lp) -> dict:
    return {"token": lp.decoded_token, "logprob": _floored(lp.logprob),
            "bytes": list(lp.decoded_token.encode("utf-8", errors="replace"))}


def _by_rank(step: dict) -> list:
    return sorted(step.values(), key=lambda lp: lp.rank)


def _floored(logprob: float) -> float:
    return max(logprob, FLOOR)
