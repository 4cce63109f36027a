"""Sequence state on the scheduler: tokens, progress through the cache, output and status."""
from __future__ import annotations

import copy
import enum
import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pagedserve.common.sampling import SamplerParams, SamplingParams

# One position's logprobs: token id -> (logprob, rank), the chosen token first.
PositionLogprobs = dict[int, tuple[float, int]]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


class Sequence:
    """One token stream. ``num_computed_tokens`` tokens have their KV in the cache.

    ``sample_index``: which of its request's samples it is (seeds its draws).
    ``candidates``: under beam search, the (token_id, logprob) pairs the executor proposed
    for the next token, most likely first; the scheduler chooses once every beam of the
    request has them. ``logprobs``: per output position, when the request asks for them.
    """

    def __init__(self, seq_id: int, prompt_token_ids: list[int], request: "Request",
                 sample_index: int = 0):
        self.seq_id = seq_id
        self.request = request
        self.sample_index = sample_index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.candidates: list[tuple[int, float]] | None = None
        self.status = SequenceStatus.WAITING
        self.on_executor = False  # the executor holds state for it (must be told to drop it)
        self.cumulative_logprob = 0.0
        self.logprobs: list[PositionLogprobs] = []
        self.output_text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = None   # set by the frontend
        # For the metrics: the output tokens they counted, and when the last of them came.
        self.num_observed_tokens = 0
        self.last_token_time: float | None = None

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

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to compute before the sequence samples (or forks its samples)."""
        # A request's first sequence stops one token short of its prompt while its other
        # samples wait to be forked: each sample then computes the last prompt token itself
        # and draws its own first token.
        end = self.num_tokens - (1 if self.request.unforked and self.sample_index == 0 else 0)
        return end - self.num_computed_tokens

    def fork(self, seq_id: int, sample_index: int | None = None) -> "Sequence":
        """A copy that continues independently (parallel sampling, beam search)."""
        child = copy.copy(self)
        child.seq_id = seq_id
        child.sample_index = self.sample_index if sample_index is None else sample_index
        child.token_ids, child.logprobs = list(self.token_ids), list(self.logprobs)
        child.num_observed_tokens, child.last_token_time = 0, None  # its tokens start anew
        if self.detokenizer is not None:
            child.detokenizer = self.detokenizer.fork()
        return child

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason


def position_logprobs(token_id: int, logprob: float, rank: int,
                      top: Iterable[tuple[int, float]]) -> PositionLogprobs:
    """A position's logprobs as vLLM returns them: the chosen token with its rank, then the
    ``top`` (token_id, logprob) pairs, most likely first, ranked from 1 (the chosen token, if
    among them, is entered once)."""
    entry = {token_id: (logprob, rank)}
    entry.update((token, (value, r)) for r, (token, value) in enumerate(top, 1))
    return entry


class Search(Protocol):
    """A request's beam search (``beam_search.BeamSearch``, which imports this module): the
    request only asks whether it is over."""

    done: bool


@dataclass
class Request:
    """A client's request: its sampling params and its sequences (one per completion)."""

    request_id: str           # the client's own id
    client: bytes             # ZeroMQ identity of the client connection
    params: SamplingParams
    prompt_token_ids: list[int]
    stream: bool
    eos_token_ids: frozenset[int] = frozenset()  # the model's: min_tokens holds them back
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)  # samples, or the live beams
    unforked: list[Sequence] = field(default_factory=list)  # samples not yet forked from seqs[0]
    beam: Search | None = None  # beam search state, when beam_width > 1
    # prompt_logprobs: those of prompt tokens 1, 2, ... as the executor scores them
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)
    sent_first: bool = False  # the first output message (with the prompt ids) went out
    prompt_from_ids: bool = False  # given as token ids: the first message carries their text
    # Timings for the metrics (time.monotonic()); num_generated: output tokens seen so far.
    first_token_time: float | None = None
    num_generated: int = 0
    num_executor_losses: int = 0  # executors lost while it held blocks on them

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.request_id)

    @functools.cached_property
    def sampler_params(self) -> SamplerParams:
        """What the executor samples this request's sequences with."""
        return self.params.sampler_params(self.eos_token_ids)

    @property
    def is_finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        for seq in self.seqs:  # a loop, not all(...): called a few times per token
            if seq.status is not SequenceStatus.FINISHED:
                return False
        return True
