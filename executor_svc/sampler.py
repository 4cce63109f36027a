"""The sampler: from each sequence's logits to its next token, and the logprobs asked for."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pagedserve.common.sampling import SamplerParams
from pagedserve.executor_svc import logits_processors
from pagedserve.executor_svc.layer_ops import LayerOps
from pagedserve.executor_svc.mirror import SeqState
from pagedserve.executor_svc.transfer import to_device


@dataclass
class SamplerOutput:
    """What one step sampled, one row per sequence."""

    token_ids: Tensor  # [S] int64
    logprobs: Tensor  # [S] float32: the sampled token's log-prob under the model's raw distribution
    top_token_ids: Tensor  # [S, K] int64, most likely first; K = largest `logprobs` in the batch
    top_logprobs: Tensor  # [S, K] float32
    # [S] int64: the sampled token's rank under the raw distribution (1: most likely, ties
    # count as above); None when no row asked for logprobs
    ranks: Tensor | None = None


class Sampler:
    """First the logits processors (``logits_processors``: logit bias, min_tokens, penalties);
    then greedy rows take the argmax, and the others apply temperature, then min-p, then
    top-k, then top-p, then draw. Logprobs are those of the raw distribution, as vLLM's.

    A row with a generator (a seeded request) draws only from it, so its tokens do not depend on
    what else is in the batch; rows without one share a draw from torch's default generator.
    A batch of greedy rows that want no logprobs and no processor takes ``ops.greedy``, bound
    once, or the tokens it gave already (``greedy``: a decode graph's).
    """

    def __init__(self, ops: LayerOps):
        self.ops = ops
        self.greedy = ops.greedy

    def __call__(self, logits: Tensor, seqs: list[SeqState],
                 generators: list[torch.Generator | None],
                 greedy: tuple[Tensor, Tensor] | None = None) -> SamplerOutput:
        params = [seq.params for seq in seqs]
        if all(_plain_greedy(seq) for seq in seqs):
            # in the logits' own dtype
            token_ids, sampled_logprobs = greedy if greedy is not None else self.greedy(logits)
            none = sampled_logprobs.new_empty(len(params), 0)
            return SamplerOutput(token_ids=token_ids, logprobs=sampled_logprobs,
                                 top_token_ids=none.long(), top_logprobs=none)
        raw = logits = logits.float()
        if any(logits_processors.adjusts(seq) for seq in seqs):
            logits = logits_processors.process(logits, seqs)
        argmax = [_is_argmax(p) for p in params]
        if all(argmax):
            token_ids = logits.argmax(-1)
        elif not any(argmax):
            token_ids = _sample(logits, params, generators)
        else:
            greedy = to_device(torch.tensor(argmax), logits.device)
            token_ids = torch.where(greedy, logits.argmax(-1), _sample(logits, params, generators))
        num_top = max(_num_top(p) for p in params)
        if num_top == 0 and all(p.logprobs is None for p in params):
            # only the sampled tokens' logprobs: no [S, vocab] of them to write
            sampled = raw.gather(-1, token_ids[:, None]).squeeze(1) - raw.logsumexp(-1)
            none = raw.new_empty(len(params), 0)
            return SamplerOutput(token_ids=token_ids, logprobs=sampled,
                                 top_token_ids=none.long(), top_logprobs=none)
        logprobs = torch.log_softmax(raw, -1)
        top_logprobs, top_token_ids = logprobs.topk(num_top, -1)
        sampled_logprobs = logprobs.gather(-1, token_ids[:, None]).squeeze(1)
        ranks = None
        if any(p.logprobs is not None for p in params):
            ranks = _ranks(logprobs, sampled_logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=sampled_logprobs,
                             top_token_ids=top_token_ids, top_logprobs=top_logprobs,
                             ranks=ranks)


def score(logits: Tensor, token_ids: Tensor,
          num_top: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Under each row's raw distribution: the logprob and rank of the row's token in
    ``token_ids``, and the row's ``num_top`` most likely tokens and their logprobs."""
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(1)
    top_logprobs, top_token_ids = logprobs.topk(num_top, -1)
    return chosen, _ranks(logprobs, chosen), top_token_ids, top_logprobs


def _ranks(logprobs: Tensor, chosen: Tensor) -> Tensor:
    """1 + the tokens more likely than each row's chosen one (ties count as above), as vLLM's."""
    return (logprobs >= chosen[:, None]).sum(-1)


def _plain_greedy(seq: SeqState) -> bool:
    """A greedy row that wants the argmax of its raw logits and its logprob, nothing more."""
    return seq.params.argmax_only and not logits_processors.below_min_tokens(seq)


def _is_argmax(params: SamplerParams) -> bool:
    # Beam search is deterministic: the scheduler chooses among the top candidates.
    return params.greedy or params.beam_width > 1


def _num_top(params: SamplerParams) -> int:
    """Top tokens to return: the logprobs asked for, and 2 x beam_width beam candidates."""
    beams = 2 * params.beam_width if params.beam_width > 1 else 0
    return max(params.logprobs or 0, beams)


def _sample(logits: Tensor, params: list[SamplerParams],
            generators: list[torch.Generator | None]) -> Tensor:
    # Greedy rows get temperature 1 here; their draw is discarded.
    temperature = to_device(torch.tensor([1.0 if p.greedy else p.temperature for p in params]),
                            logits.device)
    logits = logits / temperature[:, None]
    if any(p.min_p for p in params):
        min_p = to_device(torch.tensor([p.min_p for p in params]), logits.device)
        logits = logits_processors.mask_below_min_p(logits, min_p)
    if any(p.top_k or p.top_p < 1 for p in params):
        logits = _top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    return _draw(logits.softmax(-1), generators)


def _top_k_top_p(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """Mask (to -inf) all but each row's top-k tokens, then all but the smallest set of those
    whose probability reaches top-p. top_k 0 and top_p 1 disable."""
    vocab = logits.shape[-1]
    k = to_device(torch.tensor([k or vocab for k in top_k]), logits.device)
    # Never 0: a top_p that float32 rounds to 0 (1e-300) would mask the top token too.
    p = to_device(torch.tensor(top_p), logits.device).clamp_min(torch.finfo(torch.float32).tiny)
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    sorted_logits.masked_fill_(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    # The top token always stays (mass before it is 0); p == 1 rows are left alone even where the
    # float cumsum rounds up to 1.
    sorted_logits.masked_fill_((mass_before >= p[:, None]) & (p < 1)[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _draw(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Each row's token drawn with its probability: by inverting the row's cumulative sum at
    one uniform draw (the row's own generator's, where it has one). One draw per row, where
    the exponential race (argmax of p / Exp(1) noise) takes one per token: torch's CPU
    exponential_ took 30 ms for 32 rows of SmolLM2's vocabulary, a third of the decode step.
    The sums are float64, so that a token's share of [0, total) is its probability to 1e-16,
    and a token of probability 0 spans nothing and is never drawn."""
    uniform = torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand((), dtype=torch.float64, generator=generator,
                                      device=probs.device)
    cdf = probs.double().cumsum_(-1)
    total = cdf[:, -1:]
    # below the total, so that the first sum above the target is a token with probability > 0
    target = torch.minimum(uniform[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    # A row of NaN probabilities (NaN logits: the model's; the params cannot make them) would
    # give the vocabulary's size, an index past it: it takes the last token (its logprob says
    # NaN), and the step goes on for every other row. No check that would wait for a GPU.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
