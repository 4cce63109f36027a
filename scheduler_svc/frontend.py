"""Client-facing side of the scheduler: validate requests, tokenize, build output messages."""
from __future__ import annotations

from collections.abc import Callable

from pagedserve.common.protocol import GenerateRequest, RequestOutputMsg
from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.output_processor import DeltaTracker
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.tokenizer import Tokenizer


class InvalidRequest(ValueError):
    """A request the scheduler refuses; the message goes back to the client as is."""


class Frontend:
    """Requests in, output messages out: the live requests by (client, request_id), each with
    what its client has been sent. ``max_model_len()``: the longest context served now.
    ``sampling_defaults``: the model's, for what a request leaves unset
    (``generation_config.sampling_defaults``)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: Callable[[], int],
                 max_num_seqs: int, sampling_defaults: dict | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.sampling_defaults = sampling_defaults or {}
        self.requests: dict[tuple[bytes, str], Request] = {}
        self.trackers: dict[tuple[bytes, str], DeltaTracker] = {}

    def create(self, client: bytes, msg: GenerateRequest) -> Request:
        """Validate a generate message and build its request; raises ``InvalidRequest``."""
        if (client, msg.request_id) in self.requests:
            raise InvalidRequest(f"request_id {msg.request_id!r} is already in use by a live "
                                 f"request of this client")
        params = self._params(msg.params, msg.stream)
        prompt_ids = self._prompt_ids(msg)
        request = Request(msg.request_id, client, params, prompt_ids, msg.stream,
                          frozenset(self.tokenizer.eos_token_ids),
                          prompt_from_ids=msg.prompt is None)
        self.requests[request.key] = request
        self.trackers[request.key] = DeltaTracker(request, self.tokenizer)
        return request

    def output(self, request: Request) -> RequestOutputMsg:
        """The next message for the request's client: what changed since the last one."""
        first = not request.sent_first
        request.sent_first = True
        tracker = self.trackers[request.key]
        msg = RequestOutputMsg(request_id=request.request_id, outputs=tracker.deltas(),
                               finished=request.is_finished,
                               prompt_token_ids=request.prompt_token_ids if first else None,
                               prompt_logprobs=tracker.prompt_logprobs() if first else None,
                               prompt=self.tokenizer.decode(request.prompt_token_ids, False)
                               if first and request.prompt_from_ids else None)
        if msg.finished:
            del self.requests[request.key]
            del self.trackers[request.key]
        return msg

    def _params(self, data: dict, stream: bool) -> SamplingParams:
        try:
            params = SamplingParams.from_dict(data, self.sampling_defaults)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"invalid sampling params: {exc}") from None
        self._check_token_ids("stop_token_ids", params.stop_token_ids)
        self._check_token_ids("logit_bias", params.logit_bias)
        group = max(params.n, params.best_of or 1, params.beam_width)
        if group > self.max_num_seqs:
            raise InvalidRequest(f"the request runs {group} sequences at once (n, best_of or "
                                 f"beam_width), more than this server's max_num_seqs "
                                 f"({self.max_num_seqs})")
        if stream and params.beam_width > 1:
            raise InvalidRequest("beam search cannot stream: the best beams are known only "
                                 "at the end; use stream=False")
        if stream and (params.best_of or params.n) > params.n:
            raise InvalidRequest(f"best_of={params.best_of} > n={params.n} cannot stream: the "
                                 f"best samples are known only at the end; use stream=False")
        return params

    def _check_token_ids(self, name: str, token_ids) -> None:
        bad = next((t for t in token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"invalid sampling params: {name} holds token id {bad}, "
                                 f"outside the vocabulary [0, {self.vocab_size})")

    def _prompt_ids(self, msg: GenerateRequest) -> list[int]:
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            raise InvalidRequest("give exactly one of prompt and prompt_token_ids")
        ids = (self.tokenizer.encode(msg.prompt, msg.add_special_tokens)
               if msg.prompt is not None else msg.prompt_token_ids.tolist())
        if not ids:
            raise InvalidRequest("the prompt is empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        max_model_len = self.max_model_len()
        if len(ids) >= max_model_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens, but the context holds "
                                 f"{max_model_len} (max_model_len): shorten the prompt")
        return ids
