"""Sampled tokens in, text and stop decisions out: detokenize and check stop conditions."""
from __future__ import annotations

from collections.abc import Callable

from pagedserve.common.protocol import CompletionDelta, Logprob, PromptLogprobs, TopLogprobs
from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.beam_search import BeamSearch, Hypothesis
from pagedserve.scheduler_svc.sequence import (PositionLogprobs, Request, Sequence,
                                               position_logprobs)
from pagedserve.scheduler_svc.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputProcessor:
    """Detokenizes sampled tokens and decides when a sequence stops. ``max_model_len()``: the
    longest context served now (it is lowered to what the ready executor serves)."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: Callable[[], int]):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids,
                                                 seq.request.params.skip_special_tokens)

    def beam_search(self, request: Request) -> BeamSearch:
        """The beam search of a request, with this model's stop tokens and length limit."""
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.eos_token_ids
        max_tokens = min(params.max_tokens, self.max_model_len() - len(request.prompt_token_ids))
        return BeamSearch(params, stop_ids, max_tokens)

    def append(self, seq: Sequence, token_id: int, logprob: float,
               top: TopLogprobs | None) -> tuple[str, int | str | None] | None:
        """Add one sampled token (``top``: its position's logprobs, if asked); returns
        ``(finish_reason, stop_reason)`` when it ends the seq.

        As vLLM: nothing stops the output before ``min_tokens`` tokens; a stop token's text
        and a stop string are left out of the text unless ``include_stop_str_in_output``."""
        seq.append_token(token_id, logprob)
        if top is not None:
            seq.logprobs.append(position_logprobs(
                token_id, logprob, top.sampled_rank,
                zip(top.token_ids.tolist(), top.logprobs.tolist())))
        params = seq.request.params
        may_stop = seq.num_output_tokens > params.min_tokens
        reason = self._stop_token(params, token_id) if may_stop else None
        if reason is None or params.include_stop_str_in_output:
            if params.stop or seq.request.stream:  # the text is read as it grows
                delta = seq.detokenizer.step([token_id])
                seq.output_text += delta
                if reason is None and may_stop and params.stop:
                    reason = self._find_stop_string(seq, params, len(delta))
            else:  # read once the output ends: decoded then, all at once
                seq.detokenizer.defer([token_id])
        if reason is None and self.at_length(seq):
            reason = "length", None
        if reason is not None and not isinstance(reason[1], str):
            seq.output_text += seq.detokenizer.flush()  # text held back for a partial character
        return reason

    @staticmethod
    def keep_prompt_logprobs(request: Request, scored: PromptLogprobs) -> None:
        """Keep the logprobs of the prompt tokens the executor scored, in prompt order; a
        position already kept (a recomputed prompt) is skipped."""
        tokens = request.prompt_token_ids
        top_ids = scored.top_token_ids.reshape(len(scored.logprobs), -1).tolist()
        top_logprobs = scored.top_logprobs.reshape(len(scored.logprobs), -1).tolist()
        for i, (logprob, rank) in enumerate(zip(scored.logprobs.tolist(), scored.ranks.tolist())):
            position = scored.start + i
            if position == len(request.prompt_logprobs) + 1:
                request.prompt_logprobs.append(position_logprobs(
                    tokens[position], logprob, rank, zip(top_ids[i], top_logprobs[i])))

    def _stop_token(self, params: SamplingParams,
                    token_id: int) -> tuple[str, int | None] | None:
        if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            return "stop", None
        if token_id in params.stop_token_ids:
            return "stop", token_id
        return None

    def at_length(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether the sequence has reached its length limit (max_tokens, or the context
        limit), or will have once ``ahead`` more tokens are appended."""
        return (seq.num_output_tokens + ahead >= seq.request.params.max_tokens
                or seq.num_tokens + ahead >= self.max_model_len())

    @staticmethod
    def _find_stop_string(seq: Sequence, params: SamplingParams,
                          new_chars: int) -> tuple[str, str] | None:
        """The stop string that starts first in the text (the shortest, of those starting
        there), which ends the text: cut before it, or after it with
        ``include_stop_str_in_output``."""
        text = seq.output_text
        hits = []
        for stop in params.stop:
            # Only the tail can hold a new match: the text this token added plus a stop's length.
            index = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
            if index >= 0:
                hits.append((index, len(stop), stop))
        if not hits:
            return None
        index, length, stop = min(hits)
        seq.output_text = text[:index + length if params.include_stop_str_in_output else index]
        return "stop", stop


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
        params = self.request.params
        detokenizer = IncrementalDetokenizer(self.tokenizer, self.request.prompt_token_ids,
                                             params.skip_special_tokens)
        token_ids = hypothesis.token_ids
        # As a sampled output's: the stop token that ended it is not in the text.
        stopped = hypothesis.finish_reason == "stop" and not params.include_stop_str_in_output
        text = detokenizer.step(token_ids[:-1] if stopped else token_ids) + detokenizer.flush()
        last = token_ids[-1] if token_ids else None
        stop_reason = last if last in params.stop_token_ids else None
        return CompletionDelta(index=index, text=text, token_ids=token_ids,
                               cumulative_logprob=hypothesis.cumulative_logprob,
                               finish_reason=hypothesis.finish_reason, stop_reason=stop_reason,
                               logprobs=self._logprobs(hypothesis.logprobs))

    def prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """The prompt's logprobs, when the request asked for them: None for its first token,
        which nothing predicts."""
        if self.request.params.prompt_logprobs is None:
            return None
        return [None, *self._with_texts(self.request.prompt_logprobs)]

    def _delta(self, index: int, seq: Sequence) -> CompletionDelta:
        if seq.is_finished and seq.detokenizer is not None:  # ended unflushed (an abort)
            seq.output_text += seq.detokenizer.catch_up()
        visible = len(seq.output_text) if seq.is_finished else max(
            self.sent_text[index], len(seq.output_text) - self.holdback)
        text = seq.output_text[self.sent_text[index]:visible]
        tokens = seq.token_ids[seq.num_prompt_tokens + self.sent_tokens[index]:]  # no copy of all
        logprobs = self._logprobs(seq.logprobs[self.sent_tokens[index]:])
        self.sent_text[index] = visible
        self.sent_tokens[index] += len(tokens)
        return CompletionDelta(index=index, text=text, token_ids=tokens,
                               cumulative_logprob=seq.cumulative_logprob,
                               finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                               logprobs=logprobs)

    def _logprobs(self, positions: list[PositionLogprobs]) -> list[dict[int, Logprob]] | None:
        return None if self.request.params.logprobs is None else self._with_texts(positions)

    def _with_texts(self, positions: list[PositionLogprobs]) -> list[dict[int, Logprob]]:
        """Positions' logprobs as the client gets them, each token with its own text."""
        texts = iter(self.tokenizer.token_texts([t for entry in positions for t in entry]))
        return [{token: Logprob(value, rank, next(texts))
                 for token, (value, rank) in entry.items()} for entry in positions]
