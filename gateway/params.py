"""An OpenAI request's fields as ``SamplingParams``, by vLLM's rules.

A field the request leaves unset is not passed on, so the server's default applies. A value
``SamplingParams`` refuses is a 400 naming the request field it came from.
"""
from __future__ import annotations

import re

from pagedserve.common.sampling import SamplingParams
from pagedserve.gateway.errors import APIError
from pagedserve.gateway.schema import ChatCompletionRequest, CompletionRequest, SamplingFields

# Request fields passed on under the same name.
_AS_IS = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
          "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
          "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
          "length_penalty")


class _Fields:
    """SamplingParams fields being gathered, each with the request field it came from."""

    def __init__(self):
        self.values: dict[str, object] = {}
        self.origin: dict[str, str] = {}

    def set(self, name: str, value, source: str | None = None) -> None:
        if value is not None:
            self.values[name], self.origin[name] = value, source or name

    def build(self) -> SamplingParams:
        try:
            return SamplingParams(**self.values)
        except ValueError as exc:  # SamplingParams's messages begin with the field's name
            first = re.match(r"\w+", str(exc))
            name = first.group() if first else None
            raise APIError(400, str(exc), self.origin.get(name)) from None


def completion_params(request: CompletionRequest) -> SamplingParams:
    """``/v1/completions``: ``logprobs`` is the top-N count; ``echo`` with ``logprobs``
    also asks the prompt's logprobs."""
    fields = _common(request, request.best_of)
    fields.set("max_tokens", request.max_tokens)
    fields.set("logprobs", request.logprobs)
    if request.echo and request.logprobs is not None:
        fields.set("prompt_logprobs", request.logprobs, "echo")
    return fields.build()


def chat_params(request: ChatCompletionRequest, max_model_len: int) -> SamplingParams:
    """``/v1/chat/completions``: without a token limit, up to the model's context (the
    scheduler caps ``max_tokens`` at what the prompt leaves); ``logprobs`` is a switch and
    ``top_logprobs`` the count."""
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    fields = _common(request)
    if request.max_completion_tokens is not None:
        fields.set("max_tokens", request.max_completion_tokens, "max_completion_tokens")
    else:
        fields.set("max_tokens", max_model_len if request.max_tokens is None
                   else request.max_tokens)
    if request.logprobs:
        fields.set("logprobs", request.top_logprobs or 0, "top_logprobs")
    return fields.build()


def _common(request: SamplingFields, best_of: int | None = None) -> _Fields:
    fields = _Fields()
    for name in _AS_IS:
        fields.set(name, getattr(request, name))
    fields.set("stop", request.stop)
    if request.logit_bias is not None:
        fields.set("logit_bias", _token_bias(request.logit_bias), "logit_bias")
    if request.use_beam_search:  # vLLM: the beam width is best_of, else n
        fields.set("beam_width", best_of or request.n or 1, "best_of" if best_of else "n")
    else:
        fields.set("best_of", best_of)
    return fields


def _token_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's ``logit_bias`` keys are token ids written as strings."""
    out = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit():
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}",
                           "logit_bias")
        out[int(key)] = value
    return out
