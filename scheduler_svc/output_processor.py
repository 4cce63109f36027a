"""Sampled tokens in, text and stop decisions out: detokenize and check stop conditions."""
from __future__ import annotations

from common.protocol import CompletionDelta
from scheduler_svc.sequence import Request, Sequence
from scheduler_svc.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids)

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
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

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
    """What of a request's output has been sent to its client; builds the next delta."""

    def __init__(self, request: Request):
        self.request = request
        # Text that could still turn into the start of a stop string is held back.
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1
        self.sent_text = [0] * len(request.seqs)
        self.sent_tokens = [0] * len(request.seqs)

    def deltas(self) -> list[CompletionDelta]:
        return [self._delta(i, seq) for i, seq in enumerate(self.request.seqs)]

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
