"""Apply a step plan: keep the mirror of each sequence's state, run the model, sample.

The executor never decides which block holds what; it holds what the plans told it:
each sequence's known tokens, block table and how many tokens are in the cache.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from common import protocol as p
from common.sampling import SamplingParams
from executor_svc.attention import AttentionMetadata
from executor_svc.cache_engine import CacheEngine
from executor_svc.model import PagedLlamaForCausalLM
from executor_svc.sampler import Sampler


_BLOCK_OPS = ("swap_out", "swap_in", "copies")  # in the order _apply_block_ops applies them
_PAIRS = ("block_appends", "replace_last", *_BLOCK_OPS)  # plan fields of flat pairs


class PlanError(ValueError):
    """A plan that contradicts the executor's state; answered with an error, not applied."""


@dataclass
class SeqState:
    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int
    params: SamplingParams


class ModelRunner:
    def __init__(self, model: PagedLlamaForCausalLM, cache: CacheEngine, block_size: int):
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = cache.device
        self.sampler = Sampler()
        self.seqs: dict[int, SeqState] = {}

    def execute(self, plan: p.StepPlan) -> p.StepResult:
        start = time.perf_counter()
        self._check(plan)
        ops_start = time.perf_counter()
        self._apply_block_ops(plan)
        block_ops_ms = (time.perf_counter() - ops_start) * 1e3
        self._apply_table_updates(plan)
        batch = [(self.seqs[sid], n) for sid, n in zip(plan.seq_ids.tolist(),
                                                       plan.num_tokens.tolist())]
        sampled_ids, tokens, logprobs, top = self._run(plan.seq_ids.tolist(), batch)
        return p.StepResult(step=plan.step, seq_ids=sampled_ids, token_ids=tokens,
                            logprobs=logprobs, top_logprobs=top, block_ops_ms=block_ops_ms,
                            execute_ms=(time.perf_counter() - start) * 1e3)

    def _check(self, plan: p.StepPlan) -> None:
        """Validate the whole plan before changing any state."""
        for name in _PAIRS:
            if len(getattr(plan, name)) % 2:
                raise PlanError(f"{name} must hold pairs, got {len(getattr(plan, name))} ints")
        known = self._check_new_seqs(plan)
        if len(plan.seq_ids) != len(plan.num_tokens):
            raise PlanError(f"{len(plan.seq_ids)} seq_ids but {len(plan.num_tokens)} num_tokens")
        missing = set(plan.seq_ids.tolist()) - known
        missing |= set(plan.block_appends[0::2].tolist()) - known
        if missing:
            raise PlanError(f"unknown seq ids {sorted(missing)}")
        if len(set(plan.seq_ids.tolist())) != len(plan.seq_ids) or (plan.num_tokens < 1).any():
            raise PlanError("each scheduled seq appears once with num_tokens >= 1")
        self._check_blocks(plan)
        self._check_replace_last(plan, known)
        self._check_capacity(plan)

    def _check_new_seqs(self, plan: p.StepPlan) -> set[int]:
        """Check the new sequences; return the ids known once the plan is applied."""
        known = set(self.seqs) - set(plan.removed.tolist())
        for new in plan.new_seqs:
            if new.seq_id in known:
                raise PlanError(f"new seq {new.seq_id} already exists")
            if len(new.token_ids) == 0 or not 0 <= new.num_computed_tokens < len(new.token_ids):
                raise PlanError(f"new seq {new.seq_id}: num_computed_tokens "
                                f"{new.num_computed_tokens} with {len(new.token_ids)} tokens")
            SamplingParams.from_dict(new.params)
            known.add(new.seq_id)
        return known

    def _check_blocks(self, plan: p.StepPlan) -> None:
        num_blocks = self.cache.num_device_blocks
        blocks = [*(b for new in plan.new_seqs for b in new.block_table.tolist()),
                  *plan.block_appends[1::2].tolist(), *plan.replace_last[1::2].tolist()]
        bad = [b for b in blocks if not 0 <= b < num_blocks]
        if bad:
            raise PlanError(f"block id {bad[0]} is outside the device pool [0, {num_blocks})")
        try:
            self.cache.check(*(_pairs(getattr(plan, name)) for name in _BLOCK_OPS))
        except ValueError as exc:
            raise PlanError(str(exc)) from None

    def _check_replace_last(self, plan: p.StepPlan, known: set[int]) -> None:
        """Copy-on-write replaces the last entry of a table that exists before this plan's
        appends; a table that also grows in the same plan would make "last" ambiguous."""
        new = {n.seq_id: n for n in plan.new_seqs}
        appended = set(plan.block_appends[0::2].tolist())
        for seq_id in plan.replace_last[0::2].tolist():
            if seq_id not in known:
                raise PlanError(f"replace_last: unknown seq {seq_id}")
            if not len((new[seq_id] if seq_id in new else self.seqs[seq_id]).block_table):
                raise PlanError(f"replace_last: seq {seq_id} has no block to replace")
            if seq_id in appended:
                raise PlanError(f"replace_last: seq {seq_id} also appends blocks in this plan; "
                                f"send the copy-on-write and the appends in separate plans")

    def _check_capacity(self, plan: p.StepPlan) -> None:
        """Every scheduled token must be known and have a slot in the updated block table."""
        new = {n.seq_id: n for n in plan.new_seqs}
        appended = Counter(plan.block_appends[0::2].tolist())
        for seq_id, n in zip(plan.seq_ids.tolist(), plan.num_tokens.tolist()):
            seq = new.get(seq_id) or self.seqs[seq_id]
            end = seq.num_computed_tokens + n
            blocks = len(seq.block_table) + appended[seq_id]
            if end > len(seq.token_ids) or end > blocks * self.block_size:
                raise PlanError(f"seq {seq_id}: {n} tokens from {seq.num_computed_tokens} "
                                f"exceed its {len(seq.token_ids)} tokens or {blocks} blocks")

    def _apply_table_updates(self, plan: p.StepPlan) -> None:
        for seq_id in plan.removed.tolist():
            self.seqs.pop(seq_id, None)
        for new in plan.new_seqs:
            self.seqs[new.seq_id] = SeqState(new.token_ids.tolist(), new.block_table.tolist(),
                                             new.num_computed_tokens,
                                             SamplingParams.from_dict(new.params))
        for seq_id, block_id in _pairs(plan.block_appends).tolist():
            self.seqs[seq_id].block_table.append(block_id)
        for seq_id, block_id in _pairs(plan.replace_last).tolist():
            self.seqs[seq_id].block_table[-1] = block_id

    def _apply_block_ops(self, plan: p.StepPlan) -> None:
        # Swap out first: a block swapped out here may be swapped or copied into in this plan.
        self.cache.swap_out(_pairs(plan.swap_out))
        self.cache.swap_in(_pairs(plan.swap_in))
        self.cache.copy_blocks(_pairs(plan.copies))

    @torch.inference_mode()
    def _run(self, seq_ids: list[int], batch: list[tuple[SeqState, int]]):
        if not batch:
            empty = np.zeros(0, dtype=np.int32)
            return empty, empty, np.zeros(0, dtype=np.float32), []
        input_ids = []
        for seq, n in batch:
            input_ids.extend(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n])
        meta = AttentionMetadata.build([seq.block_table for seq, _ in batch],
                                       [seq.num_computed_tokens for seq, _ in batch],
                                       [n for _, n in batch], self.block_size, self.device)
        hidden = self.model(torch.tensor(input_ids, device=self.device), meta.positions, meta,
                            self.cache.kv_caches)
        for seq, n in batch:
            seq.num_computed_tokens += n
        # A sequence samples once all its known tokens are in the cache.
        rows = [i for i, (seq, _) in enumerate(batch)
                if seq.num_computed_tokens == len(seq.token_ids)]
        last = meta.last_token_indices[rows]
        logits = self.model.compute_logits(hidden[last])
        sampling = [batch[i][0] for i in rows]
        out = self.sampler(logits, [seq.params for seq in sampling],
                           [self._generator(seq) for seq in sampling])
        tokens = out.token_ids.tolist()
        for seq, token in zip(sampling, tokens):
            seq.token_ids.append(token)
        sampled_ids = [seq_ids[i] for i in rows]
        top = [p.TopLogprobs(seq_id=sid,
                             token_ids=out.top_token_ids[j, :seq.params.logprobs].cpu().numpy(),
                             logprobs=out.top_logprobs[j, :seq.params.logprobs].float().cpu().numpy())
               for j, (sid, seq) in enumerate(zip(sampled_ids, sampling)) if seq.params.logprobs]
        return (np.array(sampled_ids, dtype=np.int32), np.array(tokens, dtype=np.int32),
                out.logprobs.float().cpu().numpy(), top)

    def _generator(self, seq: SeqState) -> torch.Generator | None:
        """Seeded requests draw from (seed, position) alone: batch-independent and exact
        across preemption, since a recomputed sequence reaches the same positions."""
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed((seq.params.seed * 0x9E3779B97F4A7C15 + len(seq.token_ids)) % 2**63)
        return gen


def _pairs(flat: np.ndarray) -> np.ndarray:
    """Flat (a, b) pairs as an [N, 2] int64 array (a writable copy, as torch wants)."""
    return flat.astype(np.int64).reshape(-1, 2)
