"""The executor's mirror of its sequences: what the plans told it of each one (its known
tokens, how many of them are the prompt, block table and how many tokens are in the cache),
and a plan's table updates, staged beside the live states so that a plan that fails
validation changes nothing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedserve.common import protocol as p
from pagedserve.common.sampling import SamplerParams


class PlanError(ValueError):
    """A plan that contradicts the executor's state; answered with an error, not applied."""


@dataclass
class SeqState:
    """One sequence as the plans told it; ``sample_index`` tells its request's samples apart.
    ``token_ids``: the prompt (``num_prompt_tokens``), then the outputs so far."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int
    params: SamplerParams
    num_prompt_tokens: int
    sample_index: int = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def copy(self, sample_index: int | None = None) -> "SeqState":
        index = self.sample_index if sample_index is None else sample_index
        return SeqState(list(self.token_ids), list(self.block_table), self.num_computed_tokens,
                        self.params, self.num_prompt_tokens, index)


def plan_pairs(plan: p.StepPlan, name: str, width: int = 2) -> np.ndarray:
    """A plan field of flat (a, b) pairs (or wider tuples) as an [N, width] int64 array
    (a writable copy, as torch wants)."""
    flat = getattr(plan, name)
    if len(flat) % width:
        kind = "pairs" if width == 2 else f"{width}-tuples"
        raise PlanError(f"{name} must hold {kind}, got {len(flat)} ints")
    return flat.astype(np.int64).reshape(-1, width)


class TableUpdate:
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
        for child, parent, index in plan_pairs(plan, "forks", 3).tolist():
            self._add(child, self._get(parent, "fork parent").copy(sample_index=index))
        for seq_id, token in plan_pairs(plan, "append_tokens").tolist():
            self._edit(seq_id, "append_tokens").token_ids.append(token)
        for seq_id, block_id in plan_pairs(plan, "replace_last").tolist():
            table = self._edit(seq_id, "replace_last").block_table
            if not table:
                raise PlanError(f"replace_last: seq {seq_id} has no block to replace")
            table[-1] = self._block(block_id)
        for seq_id, block_id in plan_pairs(plan, "block_appends").tolist():
            self._edit(seq_id, "block_appends").block_table.append(self._block(block_id))
        return self.seqs

    def _new_state(self, new: p.NewSeq) -> SeqState:
        if len(new.token_ids) == 0 or not 0 <= new.num_computed_tokens < len(new.token_ids):
            raise PlanError(f"new seq {new.seq_id}: num_computed_tokens "
                            f"{new.num_computed_tokens} with {len(new.token_ids)} tokens")
        num_prompt_tokens = (len(new.token_ids) if new.num_prompt_tokens is None
                             else new.num_prompt_tokens)
        if not 0 < num_prompt_tokens <= len(new.token_ids):
            raise PlanError(f"new seq {new.seq_id}: num_prompt_tokens {num_prompt_tokens} "
                            f"with {len(new.token_ids)} tokens")
        table = [self._block(b) for b in new.block_table.tolist()]
        try:
            params = SamplerParams.from_dict(new.params)
        except ValueError as exc:
            raise PlanError(f"new seq {new.seq_id}: {exc}") from None
        return SeqState(new.token_ids.tolist(), table, new.num_computed_tokens, params,
                        num_prompt_tokens, new.sample_index)

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
