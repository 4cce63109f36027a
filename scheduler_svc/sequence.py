"""Sequence state on the scheduler: tokens, progress through the cache, output and status."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from common.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


class Sequence:
    """One token stream. ``num_computed_tokens`` tokens have their KV in the cache."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], request: "Request"):
        self.seq_id = seq_id
        self.request = request
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.on_executor = False  # the executor holds state for it (must be told to drop it)
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        self.output_text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = None   # set by the frontend

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason


@dataclass
class Request:
    """A client's request: its sampling params and its sequences (one per completion)."""

    request_id: str           # the client's own id
    client: bytes             # ZeroMQ identity of the client connection
    params: SamplingParams
    prompt_token_ids: list[int]
    stream: bool
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    sent_first: bool = False  # the first output message (with the prompt ids) went out

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.request_id)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
