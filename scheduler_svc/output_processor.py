"""Sampled tokens in, text and stop decisions out: detokenize and check stop conditions."""
from __future__ import annotations

from collections.abc import Callable

from pagedserve.common.protocol import CompletionDelta
from pagedserve.scheduler_svc.beam_search import BeamSearch, Hypothesis
from pagedserve.scheduler_svc.sequence import Request, Sequence
from pagedserve.scheduler_svc.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputProcessor:
    """Detokenizes sampled tokens and decides when a sequence stops. ``max_model_len()``: the
    longest context served now (it is lowered to what the ready executor serves)."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: Callable[[], int]):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids)

    def beam_search(self, request: Request) -> BeamSearch:
        """The beam search of a request, with this model's stop tokens and length limit."""
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.eos_token_ids
        max_tokens = min(params.max_tokens, self.max_model_len() - len(request.prompt_token_ids))
        return BeamSearch(params, stop_ids, max_tokens)

    def append(self, seq: Sequence, token_id: int, logprob: float,
               top: dict[int, float] | None) -> tuple[str, int | str | None] | None:
        """Add one sampled token; returns ``(finish_reason, stop_reason)`` when it ends the seq."""
        seq.append_token(token_id, logprob)
        if top is not None:
            seq.logprobs.append({**top, token_id: logprob})
        delta = seq.detokenizer.step([token_id])
        seq.output_text += delta
        reason = self._stop_reason(seq, token_id, len(delta))
        if reason is not None and not isinstance(reason[1], str):
            seq.output_text += seq.detokenizer.flush()  # text held back for a partial character
        return reason

    def _stop_reason(self, seq: Sequence, token_id: int,
                     new_chars: int) -> tuple[str, int | str | None] | None:
        params = seq.request.params
        if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            return "stop", None
        if token_id in params.stop_token_ids:
            return "stop", token_id
        if params.stop:
            hit = self._find_stop_string(seq, params.stop, new_chars)
            if hit is not None:
                return "stop", hit
        if self.at_length(seq):
            return "length", None
        return None

    def at_length(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether the sequence has reached its length limit (max_tokens, or the context
        limit), or will have once ``ahead`` more tokens are appended."""
        return (seq.num_output_tokens + ahead >= seq.request.params.max_tokens
                or seq.num_tokens + ahead >= self.max_model_len())

    @staticmethod
    def _find_stop_string(seq: Sequence, stops: list[str], new_chars: int) -> str | None:
        # Only the tail can hold a new match: the text this token added plus a stop's length.
        for stop in stops:
            start = max(0, len(seq.output_text) - new_chars - len(stop) + 1)
            index = seq.output_text.find(stop, start)
            if index >= 0:
                seq.output_text = seq.output_text[:index]  # the stop string is not returned
                return stop
        return None


class DeltaTracker:
    """What of a request's output has been sent to its client; builds the next delta.

    The client sees ``n`` completions. With ``best_of > n`` they are the ``n`` samples of
    highest cumulative logprob, and with beam search the ``n`` best hypotheses: both are
    known only at the end (the frontend refuses to stream them).
    """

    def __init__(self, request: Request, tokenizer: Tokenizer):
        self.request = request
        self.tokenizer = tokenizer
        # Text that could still turn into the start of a stop string is held back.
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1
        self.sent_text = [0] * request.params.n
        self.sent_tokens = [0] * request.params.n

    def deltas(self) -> list[CompletionDelta]:
        request, n = self.request, self.request.params.n
        if request.beam is not None:
            if not request.is_finished:
                return []
            return [self._hypothesis(i, h) for i, h in enumerate(request.beam.best(n))]
        seqs = request.seqs
        if len(seqs) > n:
            if not request.is_finished:
                return []
            seqs = sorted(seqs, key=lambda seq: seq.cumulative_logprob, reverse=True)[:n]
        return [self._delta(i, seq) for i, seq in enumerate(seqs)]

    def _hypothesis(self, index: int, hypothesis: Hypothesis) -> CompletionDelta:
        detokenizer = IncrementalDetokenizer(self.tokenizer, self.request.prompt_token_ids)
        text = detokenizer.step(hypothesis.token_ids) + detokenizer.flush()
        last = hypothesis.token_ids[-1] if hypothesis.token_ids else None
        stop_reason = last if last in self.request.params.stop_token_ids else None
        return CompletionDelta(index=index, text=text, token_ids=hypothesis.token_ids,
                               cumulative_logprob=hypothesis.cumulative_logprob,
                               finish_reason=hypothesis.finish_reason, stop_reason=stop_reason,
                               logprobs=hypothesis.logprobs if self.request.params.logprobs
                               else None)

    def _delta(self, index: int, seq: Sequence) -> CompletionDelta:
        visible = len(seq.output_text) if seq.is_finished else max(
            self.sent_text[index], len(seq.output_text) - self.holdback)
        text = seq.output_text[self.sent_text[index]:visible]
        tokens = seq.output_token_ids[self.sent_tokens[index]:]
        logprobs = seq.logprobs[self.sent_tokens[index]:] if seq.request.params.logprobs else None
        self.sent_text[index] = visible
        self.sent_tokens[index] += len(tokens)
        return CompletionDelta(index=index, text=text, token_ids=tokens,
                               cumulative_logprob=seq.cumulative_logprob,
                               finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                               logprobs=logprobs)
