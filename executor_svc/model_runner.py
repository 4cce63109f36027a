"""Apply a step plan: update the mirror of each sequence's state (``mirror``), run the block
operations and the model, sample.

The executor never decides which block holds what; it holds what the plans told it. A plan is
checked whole before anything changes (an invalid one is a ``PlanError``); once it is applied, a
failure is an ``ExecutorFault``.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from pagedserve.common import protocol as p
from pagedserve.executor_svc import backends
from pagedserve.executor_svc.autotune import Tuner
from pagedserve.executor_svc.backends.cpu import FusedDecoder
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.cuda_graphs import DecodeGraphs
from pagedserve.executor_svc.mirror import PlanError, SeqState, TableUpdate, plan_pairs
from pagedserve.executor_svc.model import PagedLlamaForCausalLM
from pagedserve.executor_svc.sampler import Sampler, score

_BLOCK_OPS = ("swap_out", "swap_in", "copies")  # in the order _apply_block_ops applies them
_SCORE_ROWS = 256  # prompt positions scored at once: their logits are [rows, vocab]


class ExecutorFault(RuntimeError):
    """A step failed after its plan was applied: the executor's mirror and KV cache can no
    longer be trusted (the cause is chained)."""


class ModelRunner:
    """Runs plans on ``model`` over ``cache`` with the attention backend that serves
    ``attention_backend`` for them (``backends.attention_backend``; timed by ``tuner``
    where there is a choice), chosen here once."""

    def __init__(self, model: PagedLlamaForCausalLM, cache: CacheEngine, block_size: int,
                 attention_backend: str = "torch", tuner: Tuner | None = None):
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = cache.device
        self.attention = backends.attention_backend(attention_backend, block_size, self.device,
                                                    model.dtype, cache.dtype, cache.null_block,
                                                    tuner, model.config)
        self.sampler = Sampler(backends.sampler_ops(model))
        self.seqs: dict[int, SeqState] = {}
        self.graphs: DecodeGraphs | None = None
        model.stack = FusedDecoder.build(model, self.attention, cache.kv_caches)

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int,
                          capture: bool = True) -> None:
        """Run pure-decode steps of up to ``max_num_seqs`` sequences (contexts up to
        ``max_model_len``) from CUDA graphs, captured now (``executor_svc.cuda_graphs``)."""
        self.graphs = DecodeGraphs(self.model, self.cache.kv_caches, self.attention,
                                   self.block_size, self.cache.null_block, max_num_seqs,
                                   max_model_len, capture)

    def execute(self, plan: p.StepPlan) -> p.StepResult:
        """Apply ``plan`` and run its step. A ``PlanError`` rejects the plan before anything
        changed; any failure after that is an ``ExecutorFault``."""
        start = time.perf_counter()
        # Build the updated sequence states aside and check the whole plan before any
        # state or KV changes, so a rejected plan leaves the executor as it was.
        seqs = TableUpdate(self.seqs, self.cache.num_device_blocks).apply(plan)
        seq_ids, batch = self._batch(plan, seqs)
        block_ops = self._block_ops(plan)
        try:
            return self._apply_and_run(plan, seqs, seq_ids, batch, block_ops, start)
        except Exception as exc:  # whatever failed, the plan was applied: the state is unknown
            raise ExecutorFault(f"step {plan.step} failed after its plan was applied: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _apply_and_run(self, plan: p.StepPlan, seqs: dict[int, SeqState], seq_ids: list[int],
                       batch: list[tuple[SeqState, int]], block_ops: list[np.ndarray] | None,
                       start: float) -> p.StepResult:
        ops_start = time.perf_counter()
        if block_ops is not None:
            self._apply_block_ops(*block_ops)
        block_ops_ms = (time.perf_counter() - ops_start) * 1e3
        self.seqs = seqs
        forward_start = time.perf_counter()
        result = self._run(seq_ids, batch)
        end = time.perf_counter()
        result.step, result.block_ops_ms = plan.step, block_ops_ms
        result.forward_ms = (end - forward_start) * 1e3
        result.execute_ms = (end - start) * 1e3
        return result

    def _batch(self, plan: p.StepPlan,
               seqs: dict[int, SeqState]) -> tuple[list[int], list[tuple[SeqState, int]]]:
        """The step's sequence ids, and each one's state with its number of new tokens.
        Every scheduled sequence is known, once, and its tokens have slots in its table."""
        seq_ids, num_tokens = plan.seq_ids.tolist(), plan.num_tokens.tolist()
        if len(seq_ids) != len(num_tokens):
            raise PlanError(f"{len(seq_ids)} seq_ids but {len(num_tokens)} num_tokens")
        if len(set(seq_ids)) != len(seq_ids) or (num_tokens and min(num_tokens) < 1):
            raise PlanError("each scheduled seq appears once with num_tokens >= 1")
        batch = []
        for seq_id, n in zip(seq_ids, num_tokens):
            seq = seqs.get(seq_id)
            if seq is None:
                raise PlanError(f"unknown seq id {seq_id}")
            end = seq.num_computed_tokens + n
            if end > len(seq.token_ids) or end > len(seq.block_table) * self.block_size:
                raise PlanError(f"seq {seq_id}: {n} tokens from {seq.num_computed_tokens} "
                                f"exceed its {len(seq.token_ids)} tokens or "
                                f"{len(seq.block_table)} blocks")
            batch.append((seq, n))
        return seq_ids, batch

    def _block_ops(self, plan: p.StepPlan) -> list[np.ndarray] | None:
        """The plan's checked block operations as pairs, in ``_BLOCK_OPS`` order; None when
        it has none (most steps)."""
        if not any(len(getattr(plan, name)) for name in _BLOCK_OPS):
            return None
        pairs = [plan_pairs(plan, name) for name in _BLOCK_OPS]
        try:
            self.cache.check(*pairs)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        return pairs

    def _apply_block_ops(self, swap_out: np.ndarray, swap_in: np.ndarray,
                         copies: np.ndarray) -> None:
        # Swap out first: a block swapped out here may be swapped or copied into in this plan.
        self.cache.swap_out(swap_out)
        self.cache.swap_in(swap_in)
        self.cache.copy_blocks(copies)

    @torch.inference_mode()
    def _run(self, seq_ids: list[int], batch: list[tuple[SeqState, int]]) -> p.StepResult:
        result = p.StepResult(step=0, seq_ids=np.zeros(0, np.int32),
                              token_ids=np.zeros(0, np.int32), logprobs=np.zeros(0, np.float32))
        if not batch:
            return result
        hidden, last_token_indices = self._forward(batch)
        tp = self.model.tp
        if tp is None or tp.is_driver:
            result.prompt_logprobs = self._prompt_logprobs(hidden, seq_ids, batch)
        rows = []  # a sequence samples once all its known tokens are in the cache
        for i, (seq, n) in enumerate(batch):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq.token_ids):
                rows.append(i)
        if not rows:
            return result
        if tp is not None and not tp.is_driver:
            # Rank 0 samples; this rank appends the same tokens, and answers no one.
            for seq_id, token in zip(*(t.tolist() for t in tp.share_tokens())):
                self.seqs[seq_id].token_ids.append(token)
            return result
        # Every sequence computing one token and sampling it (a decode step): all of hidden.
        last = hidden if len(rows) == len(hidden) else hidden[last_token_indices()[rows]]
        logits = self.model.compute_logits(last)
        seqs = [batch[i][0] for i in rows]
        out = self.sampler(logits, seqs, [self._generator(seq) for seq in seqs])
        sampled, beams = [], []
        for j, (i, seq) in enumerate(zip(rows, seqs)):
            (beams if seq.params.beam_width > 1 else sampled).append((j, seq_ids[i], seq))
        self._sampled(result, out, sampled)
        if tp is not None:
            tp.share_tokens(torch.from_numpy(result.seq_ids), torch.from_numpy(result.token_ids))
        # Beams keep their tokens: the scheduler chooses among the candidates (the top
        # 2 x beam_width, or the logprobs asked for if more) and sends the chosen token
        # back (append_tokens), possibly to a fork.
        result.beam_candidates = [
            _top(out, j, sid, max(2 * seq.params.beam_width, seq.params.logprobs or 0))
            for j, sid, seq in beams]
        return result

    def _prompt_logprobs(self, hidden: Tensor, seq_ids: list[int],
                         batch: list[tuple[SeqState, int]]) -> list[p.PromptLogprobs]:
        """Score the prompt tokens that this step's positions predict (position i predicts
        token i + 1), for the sequences that ask; before their progress moves on."""
        scored, offset = [], 0
        for seq_id, (seq, n) in zip(seq_ids, batch):
            first = seq.num_computed_tokens
            count = min(first + n, seq.num_prompt_tokens - 1) - first
            if seq.params.prompt_logprobs is not None and count > 0:
                scored.append(self._score_prompt(seq_id, seq, first,
                                                 hidden[offset:offset + count]))
            offset += n
        return scored

    def _score_prompt(self, seq_id: int, seq: SeqState, first: int,
                      hidden: Tensor) -> p.PromptLogprobs:
        """Score the prompt tokens after position ``first`` that ``hidden`` predicts, a few
        hundred positions at a time (their logits span the vocabulary)."""
        targets = torch.tensor(seq.token_ids[first + 1:first + 1 + len(hidden)],
                               device=self.device)
        parts = [score(self.model.compute_logits(rows), tokens, seq.params.prompt_logprobs)
                 for rows, tokens in zip(hidden.split(_SCORE_ROWS), targets.split(_SCORE_ROWS))]
        logprobs, ranks, top_ids, top_logprobs = (torch.cat(t).cpu().numpy() for t in zip(*parts))
        return p.PromptLogprobs(seq_id=seq_id, start=first + 1, logprobs=logprobs, ranks=ranks,
                                top_token_ids=top_ids.ravel(), top_logprobs=top_logprobs.ravel())

    def _forward(self, batch: list[tuple[SeqState, int]]
                 ) -> tuple[Tensor, Callable[[], Tensor]]:
        """The hidden states of the step's new tokens, and what says where each sequence's
        last one is (asked only where a step has more tokens than sequences: an operator
        less in a decode step); from a graph when every sequence computes one token and one
        fits."""
        tables = [seq.block_table for seq, _ in batch]
        computed = [seq.num_computed_tokens for seq, _ in batch]
        if (self.graphs is not None and all(n == 1 for _, n in batch)
                and self.graphs.serves(len(batch), max(map(len, tables)))):
            hidden = self.graphs.run([seq.token_ids[seq.num_computed_tokens] for seq, _ in batch],
                                     computed, tables)
            graphs = self.graphs  # token i is sequence i's
            return hidden, lambda: graphs.query_start_loc[:len(batch)]
        input_ids = []
        for seq, n in batch:
            input_ids.extend(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n])
        meta = self.attention.build(tables, computed, [n for _, n in batch])
        hidden = self.model(torch.tensor(input_ids, device=self.device), meta.positions, meta,
                            self.cache.kv_caches)
        return hidden, lambda: meta.last_token_indices

    @staticmethod
    def _sampled(result: p.StepResult, out, sampled: list) -> None:
        """Append each sampled token to its sequence and put it in the result."""
        token_ids, logprobs = out.token_ids, out.logprobs
        if len(sampled) != len(token_ids):  # beams among the rows: theirs stay out
            rows = [j for j, _, _ in sampled]
            token_ids, logprobs = token_ids[rows], logprobs[rows]
        tokens = token_ids.tolist()
        for (_, _, seq), token in zip(sampled, tokens):
            seq.token_ids.append(token)
        result.seq_ids = np.array([sid for _, sid, _ in sampled], dtype=np.int32)
        result.token_ids = np.array(tokens, dtype=np.int32)
        result.logprobs = logprobs.to("cpu", torch.float32).numpy()
        ranks = out.ranks.tolist() if out.ranks is not None else []
        result.top_logprobs = [_top(out, j, sid, seq.params.logprobs, ranks[j])
                               for j, sid, seq in sampled if seq.params.logprobs is not None]

    def _generator(self, seq: SeqState) -> torch.Generator | None:
        """Seeded requests draw from (seed, sample index, position) alone: batch-independent
        and exact across preemption, since a recomputed sequence reaches the same positions;
        the n samples of one request draw differently."""
        if seq.params.seed is None or seq.params.greedy or seq.params.beam_width > 1:
            return None
        gen = torch.Generator(device=self.device)
        key = (seq.params.seed * 0x9E3779B97F4A7C15 + seq.sample_index * 0xBF58476D1CE4E5B9
               + len(seq.token_ids))
        gen.manual_seed(key % 2**63)
        return gen


def _top(out, row: int, seq_id: int, k: int, sampled_rank: int = 0) -> p.TopLogprobs:
    return p.TopLogprobs(seq_id=seq_id, token_ids=out.top_token_ids[row, :k].cpu().numpy(),
                         logprobs=out.top_logprobs[row, :k].float().cpu().numpy(),
                         sampled_rank=sampled_rank)
