"""One scheduled step: what the next plan carries, and its wire form (``StepPlan``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.common.protocol import NewSeq, StepPlan
from pagedserve.scheduler_svc.block_manager import AppendResult
from pagedserve.scheduler_svc.sequence import Sequence


@dataclass
class ScheduledStep:
    """The sequences a step computes and the table edits and block ops that come with it;
    complete on its own, so the plan is built without asking the block manager again."""

    removed: list[int] = field(default_factory=list)
    new_seqs: list[Sequence] = field(default_factory=list)
    new_tables: list[tuple[int, ...]] = field(default_factory=list)  # of new_seqs, whole
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    block_appends: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    forks: list[tuple[int, int, int]] = field(default_factory=list)
    append_tokens: list[tuple[int, int]] = field(default_factory=list)
    replace_last: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)

    def start(self, seq: Sequence, block_table: tuple[int, ...]) -> None:
        """A sequence the executor gets whole (admitted, swapped in or recomputed), with
        its final table for this step."""
        self.new_seqs.append(seq)
        self.new_tables.append(block_table)

    def to_plan(self, step_no: int) -> StepPlan:
        """The wire form: new sequences in full, running ones as (id, token count) only."""
        return StepPlan(
            step=step_no, removed=self.removed,
            new_seqs=[NewSeq(seq_id=s.seq_id, token_ids=s.token_ids, block_table=table,
                             params=s.request.sampler_params.to_dict(),
                             num_computed_tokens=s.num_computed_tokens,
                             sample_index=s.sample_index,
                             num_prompt_tokens=s.num_prompt_tokens)
                      for s, table in zip(self.new_seqs, self.new_tables)],
            seq_ids=[s.seq_id for s in self.seqs], num_tokens=self.num_tokens,
            block_appends=_flat(self.block_appends), swap_out=_flat(self.swap_out),
            swap_in=_flat(self.swap_in), copies=_flat(self.copies), forks=_flat(self.forks),
            append_tokens=_flat(self.append_tokens), replace_last=_flat(self.replace_last))

    def drop_edits(self, seq_ids: set[int]) -> None:
        """Forget forks and chosen tokens of sequences the plan removes (preempted or
        finished): a preempted sequence comes back whole, as a new one."""
        self.forks = [f for f in self.forks if f[0] not in seq_ids and f[1] not in seq_ids]
        self.append_tokens = [a for a in self.append_tokens if a[0] not in seq_ids]

    def record(self, seq: Sequence, append: AppendResult) -> None:
        """Put what ``append_slot`` did to a running sequence's table into the plan."""
        if append.new_block is not None:
            self.block_appends.append((seq.seq_id, append.new_block))
        if append.cow is not None:
            self.copies.append(append.cow)
            self.replace_last.append((seq.seq_id, append.cow[1]))


def _flat(pairs: list[tuple[int, ...]]) -> list[int]:
    return [x for pair in pairs for x in pair]
