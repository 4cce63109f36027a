"""The logits processors of the sampler, on the batch, in vLLM's order: the logit bias and the
min_tokens mask, then the repetition, frequency and presence penalties; min-p comes after the
temperature (``sampler``).

Each builds its small per-row tensors with one loop over the rows that ask for it; the
vocabulary is touched only by tensor operations. A row's history is its ``SeqState``'s token
ids: the prompt, then the outputs so far.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from pagedserve.executor_svc.mirror import SeqState


def adjusts(seq: SeqState) -> bool:
    """Whether a processor of ``process`` changes the row's logits at this step."""
    params = seq.params
    return bool(params.logit_bias) or below_min_tokens(seq) or params.penalised


def process(logits: Tensor, seqs: list[SeqState]) -> Tensor:
    """The batch's logits with each row's processors applied: a new tensor, in which the rows
    that ask for none are as they were."""
    logits = logits.clone()
    biased = [i for i, seq in enumerate(seqs) if seq.params.logit_bias]
    if biased:
        add_logit_bias(logits, biased, [seqs[i].params.logit_bias for i in biased])
    short = [i for i, seq in enumerate(seqs) if below_min_tokens(seq)]
    if short:
        mask_tokens(logits, short, [seqs[i].params.stop_token_ids for i in short])
    penalised = [i for i, seq in enumerate(seqs) if seq.params.penalised]
    if penalised:
        rows = torch.tensor(penalised, device=logits.device)
        logits[rows] = penalise(logits[rows], [seqs[i] for i in penalised])
    return logits


def add_logit_bias(logits: Tensor, rows: list[int], biases: list[dict[int, float]]) -> None:
    """Add each of ``rows``' bias (token id -> bias) to its logits, in place."""
    row_ids = [row for row, bias in zip(rows, biases) for _ in bias]
    token_ids = [token for bias in biases for token in bias]
    values = [value for bias in biases for value in bias.values()]
    logits.index_put_(_indices(logits, row_ids, token_ids),
                      torch.tensor(values, dtype=logits.dtype, device=logits.device),
                      accumulate=True)


def mask_tokens(logits: Tensor, rows: list[int], token_ids: list[list[int]]) -> None:
    """Make each of ``rows``' tokens impossible (-inf), in place."""
    row_ids = [row for row, tokens in zip(rows, token_ids) for _ in tokens]
    flat = [token for tokens in token_ids for token in tokens]
    logits[_indices(logits, row_ids, flat)] = float("-inf")


def penalise(logits: Tensor, seqs: list[SeqState]) -> Tensor:
    """Each row's logits under its sequence's penalties, as vLLM's ``apply_penalties``: a
    token seen in the prompt or the output has its logit divided by ``repetition_penalty``
    (multiplied when negative); then each output occurrence subtracts ``frequency_penalty``,
    and being in the output at all subtracts ``presence_penalty``."""
    output_counts, in_prompt = _token_counts(seqs, logits.shape[-1], logits.device)
    in_output = output_counts > 0
    repetition, frequency, presence = (
        torch.tensor([getattr(seq.params, name) for seq in seqs], dtype=logits.dtype,
                     device=logits.device)[:, None]
        for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
    # Within [1e-30, 1e30]: a penalty that float32 rounds to 0 or inf would make a logit
    # inf (x / 0) or NaN (0 x inf); at either bound the outcome is already certain.
    penalty = torch.where(in_prompt | in_output, repetition.clamp(1e-30, 1e30), 1.0)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    return logits - frequency * output_counts - presence * in_output


def mask_below_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask (to -inf) the tokens whose probability is below ``min_p`` (one per row) times
    that of the row's most likely token; min_p 0 keeps every token."""
    probs = logits.softmax(-1)
    threshold = min_p[:, None] * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def below_min_tokens(seq: SeqState) -> bool:
    """Whether the row's stop tokens are masked at this step (its output is shorter than
    ``min_tokens``; stop_token_ids is empty without min_tokens)."""
    return bool(seq.params.stop_token_ids) and seq.num_output_tokens < seq.params.min_tokens


def _token_counts(seqs: list[SeqState], vocab: int, device) -> tuple[Tensor, Tensor]:
    """[S, vocab]: how often each output token occurs, and whether each token is in the
    prompt, per sequence; built from the token ids in one pass."""
    lengths = np.array([len(seq.token_ids) for seq in seqs])
    token_ids = np.fromiter(itertools.chain.from_iterable(seq.token_ids for seq in seqs),
                            np.int64, int(lengths.sum()))
    rows = np.repeat(np.arange(len(seqs)), lengths)
    # a position is an output once past its sequence's prompt
    first_output = np.cumsum(lengths) - lengths + [seq.num_prompt_tokens for seq in seqs]
    is_output = np.arange(len(token_ids)) >= np.repeat(first_output, lengths)
    output_counts = torch.zeros(len(seqs), vocab, device=device)
    output_counts.index_put_(_indices(output_counts, rows[is_output], token_ids[is_output]),
                             torch.ones(int(is_output.sum()), device=device), accumulate=True)
    in_prompt = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
    in_prompt[_indices(in_prompt, rows[~is_output], token_ids[~is_output])] = True
    return output_counts, in_prompt


def _indices(like: Tensor, rows, columns) -> tuple[Tensor, Tensor]:
    return (torch.as_tensor(rows, dtype=torch.long).to(like.device),
            torch.as_tensor(columns, dtype=torch.long).to(like.device))
