"""Beam search with transformers' semantics: which beams continue, which hypotheses finish.

Policy only. Each step the executor proposes every live beam's top ``2 * beam_width`` next
tokens; ``BeamSearch.step`` ranks all (beam, token) continuations by cumulative logprob,
keeps the best ``beam_width`` that did not stop as the next beams, and offers the ones that
stopped (EOS, a stop token, or the length limit) and rank among the best ``beam_width`` to
the finished hypotheses, scored ``cumulative_logprob / output_length ** length_penalty``.
The scheduler carries the choices out: a beam chosen once continues in place, a beam chosen
again is forked (its blocks shared copy-on-write), a beam not chosen is freed.

Stopping follows ``GenerationMixin._beam_search``: with ``early_stopping`` the search ends
once ``beam_width`` hypotheses are finished; without it, once the best running beam, scored
at its current length, cannot beat the worst of ``beam_width`` finished hypotheses.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.sequence import PositionLogprobs, Sequence, position_logprobs


@dataclass
class Hypothesis:
    """A finished beam: its output tokens (the stopping token included) and score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str                      # "stop" | "length" | "abort"
    logprobs: list[PositionLogprobs]


@dataclass(frozen=True)
class Choice:
    """The next beam: ``parent`` extended by ``token_id``."""

    parent: Sequence
    token_id: int
    logprob: float


class BeamSearch:
    def __init__(self, params: SamplingParams, stop_token_ids: set[int], max_tokens: int):
        self.width = params.beam_width
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.stop_token_ids = stop_token_ids  # EOS (unless ignore_eos) and stop_token_ids
        self.max_tokens = max_tokens          # output tokens at most
        self.num_logprobs = params.logprobs   # top-N logprobs per position, if asked
        self.hypotheses: list[Hypothesis] = []  # the best finished, at most ``width``, best first
        self.done = False
        self._can_improve = True

    def step(self, beams: list[Sequence]) -> list[Choice]:
        """Rank the live beams' candidates; returns the next beams, none once done."""
        ranked = sorted(((beam.cumulative_logprob + logprob, beam, token, logprob)
                         for beam in beams for token, logprob in beam.candidates),
                        key=lambda c: c[0], reverse=True)[:2 * self.width]
        output_len = beams[0].num_output_tokens + 1  # beams advance together
        stops = [self._stops(token, output_len) for _, _, token, _ in ranked]
        # Only continuations among the best ``width`` may finish, as in transformers; the
        # rest exist so that ``width`` beams can go on.
        if self._accepts_hypotheses():
            for (total, beam, token, logprob), stop in list(zip(ranked, stops))[:self.width]:
                if stop is not None:
                    self._add(beam, token, logprob, total, stop)
        running = [Choice(beam, token, logprob)
                   for (_, beam, token, logprob), stop in zip(ranked, stops) if stop is None]
        running = running[:self.width]
        self._update_done(running, all(stop is not None for stop in stops), output_len)
        return [] if self.done else running

    def finish(self, beams: list[Sequence], reason: str) -> None:
        """End the search early (abort), keeping the live beams as hypotheses too."""
        for beam in beams:
            self._add_hypothesis(beam.output_token_ids, beam.cumulative_logprob, reason,
                                 beam.logprobs)
        self.done = True

    def best(self, n: int) -> list[Hypothesis]:
        return self.hypotheses[:n]

    def _stops(self, token: int, output_len: int) -> str | None:
        if token in self.stop_token_ids:
            return "stop"
        return "length" if output_len >= self.max_tokens else None

    def _accepts_hypotheses(self) -> bool:
        full = len(self.hypotheses) == self.width
        return self._can_improve and not (full and self.early_stopping)

    def position_logprobs(self, beam: Sequence, token: int,
                          logprob: float) -> PositionLogprobs | None:
        """The logprobs entry of ``beam``'s next position, when the request asked for them."""
        if self.num_logprobs is None:
            return None
        rank = next(r for r, (t, _) in enumerate(beam.candidates, 1) if t == token)
        return position_logprobs(token, logprob, rank, beam.candidates[:self.num_logprobs])

    def _add(self, beam: Sequence, token: int, logprob: float, total: float, reason: str) -> None:
        entry = self.position_logprobs(beam, token, logprob)
        logprobs = beam.logprobs + [entry] if entry is not None else []
        self._add_hypothesis([*beam.output_token_ids, token], total, reason, logprobs)

    def _add_hypothesis(self, token_ids: list[int], total: float, reason: str,
                        logprobs: list) -> None:
        score = total / max(len(token_ids), 1) ** self.length_penalty
        self.hypotheses.append(Hypothesis(token_ids, total, score, reason, logprobs))
        self.hypotheses.sort(key=lambda h: h.score, reverse=True)
        del self.hypotheses[self.width:]

    def _update_done(self, running: list[Choice], all_stopped: bool, output_len: int) -> None:
        if self._can_improve and running and len(self.hypotheses) == self.width:
            # transformers' heuristic: score the best running beam at its current length.
            best = (running[0].parent.cumulative_logprob + running[0].logprob) \
                / output_len ** self.length_penalty
            self._can_improve = best > self.hypotheses[-1].score
        full = len(self.hypotheses) == self.width
        self.done = (not self._can_improve or (full and self.early_stopping) or all_stopped
                     or not running)
