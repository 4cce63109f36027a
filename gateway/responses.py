"""Response bodies and stream chunks of the OpenAI endpoints, built from the client's
``RequestOutput``s: ids (``cmpl-``, ``chatcmpl-``), ``object``, ``created``, choices with
OpenAI's ``finish_reason``, ``usage``, and logprobs in each endpoint's shape.

A request with several prompts numbers its choices ``prompt_index * n + index``, as OpenAI
does. One ``Shaper`` serves one HTTP request, whole or streamed.
"""
from __future__ import annotations

import time
import uuid

from pagedserve.common.client import CompletionOutput, RequestOutput
from pagedserve.gateway.logprobs import chat_logprobs, completion_logprobs, echoed_logprobs


class Shaper:
    """What every response of one request shares: its id, model, creation time, ``n``
    and the token counts so far."""

    ID_PREFIX = OBJECT = CHUNK_OBJECT = ""

    def __init__(self, model: str, n: int):
        self.id = f"{self.ID_PREFIX}{uuid.uuid4().hex}"
        self.model, self.n = model, n
        self.created = int(time.time())
        self.prompt_tokens = self.completion_tokens = 0

    def request_id(self, prompt_index: int) -> str:
        """The scheduler's id of one prompt's request: this response's id, numbered."""
        return f"{self.id}-{prompt_index}"

    def count(self, out: RequestOutput, first: bool) -> None:
        """Add a whole output's, or a stream delta's, tokens to the usage."""
        if first:
            self.prompt_tokens += len(out.prompt_token_ids)
        self.completion_tokens += sum(len(o.token_ids) for o in out.outputs)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def envelope(self, obj: str, choices: list[dict], usage: dict | None) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def usage_chunk(self) -> dict:
        """The last chunk of a stream with ``stream_options.include_usage``."""
        return self.envelope(self.CHUNK_OBJECT, [], self.usage())

    def choice_index(self, prompt_index: int, out: CompletionOutput) -> int:
        return prompt_index * self.n + out.index

    def opening(self) -> list[dict]:
        """The chunks a stream begins with, before any output."""
        return []


class CompletionShaper(Shaper):
    """``/v1/completions``; ``echo``: each choice's text begins with its prompt's."""

    ID_PREFIX = "cmpl-"
    OBJECT = CHUNK_OBJECT = "text_completion"

    def __init__(self, model: str, n: int, echo: bool, logprobs: bool):
        super().__init__(model, n)
        self.echo, self.logprobs = echo, logprobs
        self._offsets: dict[int, int] = {}  # choice -> text offset reached, for logprobs

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for prompt_index, out in enumerate(outputs):
            self.count(out, first=True)
            choices += [self._choice(prompt_index, out, o) for o in out.outputs]
        return self.envelope(self.OBJECT, choices, self.usage())

    def chunk(self, prompt_index: int, delta: RequestOutput, first: bool) -> dict:
        """One stream chunk: every choice of ``delta`` (one step of one prompt)."""
        self.count(delta, first)
        return self.envelope(self.CHUNK_OBJECT,
                             [self._choice(prompt_index, delta, o, first) for o in delta.outputs],
                             None)

    def _choice(self, prompt_index: int, out: RequestOutput, o: CompletionOutput,
                first: bool = True) -> dict:
        index = self.choice_index(prompt_index, o)
        prefix = out.prompt if self.echo and first else ""
        choice = {"index": index, "text": prefix + o.text, "logprobs": None,
                  "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
        if self.logprobs:
            offset = self._offsets.get(index, len(prefix))
            logprobs = completion_logprobs(o.token_ids, o.logprobs, offset)
            if prefix and out.prompt_logprobs is not None:
                logprobs = echoed_logprobs(prefix, out.prompt_token_ids, out.prompt_logprobs,
                                           logprobs)
            choice["logprobs"] = logprobs
            self._offsets[index] = offset + len(o.text)
        return choice


class ChatShaper(Shaper):
    """``/v1/chat/completions``; a stream opens each choice with the assistant's role."""

    ID_PREFIX = "chatcmpl-"
    OBJECT = "chat.completion"
    CHUNK_OBJECT = "chat.completion.chunk"

    def __init__(self, model: str, n: int, top_logprobs: int | None):
        super().__init__(model, n)
        self.top_logprobs = top_logprobs  # None: no logprobs

    def response(self, out: RequestOutput) -> dict:
        self.count(out, first=True)
        choices = [{"index": o.index,
                    "message": {"role": "assistant", "content": o.text},
                    "logprobs": self._logprobs(o),
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                   for o in out.outputs]
        return self.envelope(self.OBJECT, choices, self.usage())

    def opening(self) -> list[dict]:
        """Each choice's role, before any content."""
        return [self.envelope(self.CHUNK_OBJECT, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(self.n)], None)]

    def chunk(self, prompt_index: int, delta: RequestOutput, first: bool) -> dict:
        """One stream chunk: every choice of ``delta`` (one step)."""
        self.count(delta, first)
        return self.envelope(self.CHUNK_OBJECT, [
            {"index": self.choice_index(prompt_index, o),
             "delta": {"content": o.text} if o.text else {},
             "logprobs": self._logprobs(o), "finish_reason": o.finish_reason,
             "stop_reason": o.stop_reason} for o in delta.outputs], None)

    def _logprobs(self, o: CompletionOutput) -> dict | None:
        if self.top_logprobs is None:
            return None
        return chat_logprobs(o.token_ids, o.logprobs, self.top_logprobs)
