"""Apply a step plan: keep the mirror of each sequence's state, run the model, sample.

The executor never decides which block holds what; it holds what the plans told it:
each sequence's known tokens, block table and how many tokens are in the cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pagedserve.common import protocol as p
from pagedserve.common.sampling import SamplerParams
from pagedserve.executor_svc.attention import AttentionMetadata, get_backend
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.cuda_graphs import DecodeGraphs
from pagedserve.executor_svc.model import PagedLlamaForCausalLM
from pagedserve.executor_svc.sampler import Sampler

_BLOCK_OPS = ("swap_out", "swap_in", "copies")  # in the order _apply_block_ops applies them


class PlanError(ValueError):
    """A plan that contradicts the executor's state; answered with an error, not applied."""


@dataclass
class SeqState:
    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int
    params: SamplerParams
    sample_index: int = 0

    def copy(self, sample_index: int | None = None) -> "SeqState":
        index = self.sample_index if sample_index is None else sample_index
        return SeqState(list(self.token_ids), list(self.block_table), self.num_computed_tokens,
                        self.params, index)


class ModelRunner:
    def __init__(self, model: PagedLlamaForCausalLM, cache: CacheEngine, block_size: int,
                 attention_backend: str = "torch"):
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = cache.device
        self.attention = get_backend(attention_backend)
        self.sampler = Sampler()
        self.seqs: dict[int, SeqState] = {}
        self.graphs: DecodeGraphs | None = None

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int,
                          capture: bool = True) -> None:
        """Run pure-decode steps of up to ``max_num_seqs`` sequences (contexts up to
        ``max_model_len``) from CUDA graphs, captured now (``executor_svc.cuda_graphs``)."""
        self.graphs = DecodeGraphs(self.model, self.cache.kv_caches, self.attention,
                                   self.block_size, self.cache.null_block, max_num_seqs,
                                   max_model_len, capture)

    def execute(self, plan: p.StepPlan) -> p.StepResult:
        start = time.perf_counter()
        # Build the updated sequence states aside and check the whole plan before any
        # state or KV changes, so a rejected plan leaves the executor as it was.
        seqs = _TableUpdate(self.seqs, self.cache.num_device_blocks).apply(plan)
        self._check_batch(plan, seqs)
        self._check_block_ops(plan)
        ops_start = time.perf_counter()
        self._apply_block_ops(plan)
        block_ops_ms = (time.perf_counter() - ops_start) * 1e3
        self.seqs = seqs
        batch = [(seqs[sid], n) for sid, n in zip(plan.seq_ids.tolist(), plan.num_tokens.tolist())]
        forward_start = time.perf_counter()
        result = self._run(plan.seq_ids.tolist(), batch)
        end = time.perf_counter()
        result.step, result.block_ops_ms = plan.step, block_ops_ms
        result.forward_ms = (end - forward_start) * 1e3
        result.execute_ms = (end - start) * 1e3
        return result

    def _check_batch(self, plan: p.StepPlan, seqs: dict[int, SeqState]) -> None:
        """Every scheduled sequence is known, once, and its tokens have slots in its table."""
        seq_ids = plan.seq_ids.tolist()
        if len(seq_ids) != len(plan.num_tokens):
            raise PlanError(f"{len(seq_ids)} seq_ids but {len(plan.num_tokens)} num_tokens")
        if len(set(seq_ids)) != len(seq_ids) or (plan.num_tokens < 1).any():
            raise PlanError("each scheduled seq appears once with num_tokens >= 1")
        for seq_id, n in zip(seq_ids, plan.num_tokens.tolist()):
            seq = seqs.get(seq_id)
            if seq is None:
                raise PlanError(f"unknown seq id {seq_id}")
            end = seq.num_computed_tokens + n
            if end > len(seq.token_ids) or end > len(seq.block_table) * self.block_size:
                raise PlanError(f"seq {seq_id}: {n} tokens from {seq.num_computed_tokens} "
                                f"exceed its {len(seq.token_ids)} tokens or "
                                f"{len(seq.block_table)} blocks")

    def _check_block_ops(self, plan: p.StepPlan) -> None:
        try:
            self.cache.check(*(_pairs(plan, name) for name in _BLOCK_OPS))
        except ValueError as exc:
            raise PlanError(str(exc)) from None

    def _apply_block_ops(self, plan: p.StepPlan) -> None:
        # Swap out first: a block swapped out here may be swapped or copied into in this plan.
        self.cache.swap_out(_pairs(plan, "swap_out"))
        self.cache.swap_in(_pairs(plan, "swap_in"))
        self.cache.copy_blocks(_pairs(plan, "copies"))

    @torch.inference_mode()
    def _run(self, seq_ids: list[int], batch: list[tuple[SeqState, int]]) -> p.StepResult:
        result = p.StepResult(step=0, seq_ids=np.zeros(0, np.int32),
                              token_ids=np.zeros(0, np.int32), logprobs=np.zeros(0, np.float32))
        if not batch:
            return result
        hidden, last_token_indices = self._forward(batch)
        for seq, n in batch:
            seq.num_computed_tokens += n
        # A sequence samples once all its known tokens are in the cache.
        rows = [i for i, (seq, _) in enumerate(batch)
                if seq.num_computed_tokens == len(seq.token_ids)]
        if not rows:
            return result
        tp = self.model.tp
        if tp is not None and not tp.is_driver:
            # Rank 0 samples; this rank appends the same tokens, and answers no one.
            for seq_id, token in zip(*(t.tolist() for t in tp.share_tokens())):
                self.seqs[seq_id].token_ids.append(token)
            return result
        logits = self.model.compute_logits(hidden[last_token_indices[rows]])
        seqs = [batch[i][0] for i in rows]
        out = self.sampler(logits, [seq.params for seq in seqs],
                           [self._generator(seq) for seq in seqs])
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

    def _forward(self, batch: list[tuple[SeqState, int]]) -> tuple[Tensor, Tensor]:
        """The hidden states of the step's new tokens, and where each sequence's last one is;
        from a graph when every sequence computes one token and one fits."""
        tables = [seq.block_table for seq, _ in batch]
        computed = [seq.num_computed_tokens for seq, _ in batch]
        if (self.graphs is not None and all(n == 1 for _, n in batch)
                and self.graphs.serves(len(batch), max(map(len, tables)))):
            hidden = self.graphs.run([seq.token_ids[seq.num_computed_tokens] for seq, _ in batch],
                                     computed, tables)
            return hidden, self.graphs.query_start_loc[:len(batch)]  # token i is sequence i's
        input_ids = []
        for seq, n in batch:
            input_ids.extend(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n])
        meta = AttentionMetadata.build(tables, computed, [n for _, n in batch], self.block_size,
                                       self.device, self.attention, self.cache.null_block)
        hidden = self.model(torch.tensor(input_ids, device=self.device), meta.positions, meta,
                            self.cache.kv_caches)
        return hidden, meta.last_token_indices

    @staticmethod
    def _sampled(result: p.StepResult, out, sampled: list) -> None:
        """Append each sampled token to its sequence and put it in the result."""
        rows = [j for j, _, _ in sampled]
        tokens = out.token_ids[rows].tolist()
        for (_, _, seq), token in zip(sampled, tokens):
            seq.token_ids.append(token)
        result.seq_ids = np.array([sid for _, sid, _ in sampled], dtype=np.int32)
        result.token_ids = np.array(tokens, dtype=np.int32)
        result.logprobs = out.logprobs[rows].float().cpu().numpy()
        result.top_logprobs = [_top(out, j, sid, seq.params.logprobs)
                               for j, sid, seq in sampled if seq.params.logprobs]

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


def _top(out, row: int, seq_id: int, k: int) -> p.TopLogprobs:
    return p.TopLogprobs(seq_id=seq_id, token_ids=out.top_token_ids[row, :k].cpu().numpy(),
                         logprobs=out.top_logprobs[row, :k].float().cpu().numpy())


def _pairs(plan: p.StepPlan, name: str, width: int = 2) -> np.ndarray:
    """A plan field of flat (a, b) pairs (or wider tuples) as an [N, width] int64 array
    (a writable copy, as torch wants)."""
    flat = getattr(plan, name)
    if len(flat) % width:
        kind = "pairs" if width == 2 else f"{width}-tuples"
        raise PlanError(f"{name} must hold {kind}, got {len(flat)} ints")
    return flat.astype(np.int64).reshape(-1, width)


class _TableUpdate:
    """The sequence states after a plan's table updates, built beside the current ones.

    Order: removed, new sequences, forks, chosen tokens, copy-on-write replacements, block
    appends. States are copied before their first change (copy-on-write, as the blocks).
    """

    def __init__(self, current: dict[int, SeqState], num_blocks: int):
        self.seqs = dict(current)
        self.num_blocks = num_blocks
        self.private: set[int] = set()  # states already copied for this plan

    def apply(self, plan: p.StepPlan) -> dict[int, SeqState]:
        for seq_id in plan.removed.tolist():
            self.seqs.pop(seq_id, None)
        for new in plan.new_seqs:
            self._add(new.seq_id, self._new_state(new))
        for child, parent, index in _pairs(plan, "forks", 3).tolist():
            self._add(child, self._get(parent, "fork parent").copy(sample_index=index))
        for seq_id, token in _pairs(plan, "append_tokens").tolist():
            self._edit(seq_id, "append_tokens").token_ids.append(token)
        for seq_id, block_id in _pairs(plan, "replace_last").tolist():
            table = self._edit(seq_id, "replace_last").block_table
            if not table:
                raise PlanError(f"replace_last: seq {seq_id} has no block to replace")
            table[-1] = self._block(block_id)
        for seq_id, block_id in _pairs(plan, "block_appends").tolist():
            self._edit(seq_id, "block_appends").block_table.append(self._block(block_id))
        return self.seqs

    def _new_state(self, new: p.NewSeq) -> SeqState:
        if len(new.token_ids) == 0 or not 0 <= new.num_computed_tokens < len(new.token_ids):
            raise PlanError(f"new seq {new.seq_id}: num_computed_tokens "
                            f"{new.num_computed_tokens} with {len(new.token_ids)} tokens")
        table = [self._block(b) for b in new.block_table.tolist()]
        return SeqState(new.token_ids.tolist(), table, new.num_computed_tokens,
                        SamplerParams.from_dict(new.params), new.sample_index)

    def _add(self, seq_id: int, state: SeqState) -> None:
        if seq_id in self.seqs:
            raise PlanError(f"new seq {seq_id} already exists")
        self.seqs[seq_id] = state
        self.private.add(seq_id)

    def _get(self, seq_id: int, what: str) -> SeqState:
        if seq_id not in self.seqs:
            raise PlanError(f"{what}: unknown seq id {seq_id}")
        return self.seqs[seq_id]

    def _edit(self, seq_id: int, what: str) -> SeqState:
        state = self._get(seq_id, what)
        if seq_id not in self.private:
            state = self.seqs[seq_id] = state.copy()
            self.private.add(seq_id)
        return state

    def _block(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise PlanError(f"block id {block_id} is outside the device pool "
                            f"[0, {self.num_blocks})")
        return block_id
