"""The request bodies of the OpenAI endpoints, as pydantic models.

Strict: a wrong type is refused, never coerced ("1" is not a number), non-finite numbers
are refused, and so is a field the endpoint does not know (a typo would otherwise be
ignored in silence). The value checks themselves are ``SamplingParams``'s, done once.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage and no choices


class SamplingFields(_Body):
    """Fields both endpoints take. ``None`` (or absent) leaves a field to the server."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # for the operator's logs only
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    use_beam_search: bool = False
    length_penalty: float | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: the server's default (16, as OpenAI's)
    best_of: int | None = None
    logprobs: int | None = None  # top-N per token, the sampled token's always
    echo: bool = False  # the prompt before the completion


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]  # parts are joined with newlines, as vLLM does
    name: str | None = None

    def to_dict(self) -> dict:
        """The message as the chat template reads it."""
        content = self.content if isinstance(self.content, str) else "\n".join(
            part.text for part in self.content)
        return {"role": self.role, "content": content,
                **({"name": self.name} if self.name is not None else {})}


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    max_tokens: int | None = None  # None: up to the model's context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
