"""Continuous batching: who computes what in the next step.

Policy only; the block manager owns the blocks. Each step first lets every running
sequence decode one token (oldest first), preempting the latest arrivals for recompute
when blocks run out, then admits waiting prompts in arrival order while the token,
sequence and block budgets allow.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.protocol import NewSeq, StepPlan
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """What the next plan carries; the service turns it into a ``StepPlan``."""

    removed: list[int] = field(default_factory=list)
    new_seqs: list[Sequence] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    block_appends: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)

    def to_plan(self, step_no: int, tables: dict[int, list[int]]) -> StepPlan:
        """The wire form: new sequences in full, running ones as (id, token count) only."""
        return StepPlan(
            step=step_no, removed=self.removed,
            new_seqs=[NewSeq(seq_id=s.seq_id, token_ids=s.token_ids, block_table=tables[s.seq_id],
                             params=s.request.params.to_dict(),
                             num_computed_tokens=s.num_computed_tokens) for s in self.new_seqs],
            seq_ids=[s.seq_id for s in self.seqs], num_tokens=self.num_tokens,
            block_appends=[x for pair in self.block_appends for x in pair])


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Finished sequences keep their blocks until the next schedule(): by then the
        # executor has acknowledged the step that last used them, so no block is reused
        # while a step in flight may still write to it.
        self._to_release: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_release)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop, length or abort); its blocks are released at the next step."""
        if seq.is_finished:
            return
        seq.finish(reason, stop_reason)
        self._to_release.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(removed=self._release_finished())
        preempted = self._schedule_running(step)
        if not preempted:
            self._schedule_waiting(step)
        return step

    def update(self, step: ScheduledStep) -> None:
        """The executor acknowledged ``step``: its tokens are now in the cache."""
        for seq, num_tokens in zip(step.seqs, step.num_tokens):
            seq.num_computed_tokens += num_tokens

    def _release_finished(self) -> list[int]:
        removed = []
        for seq in self._to_release:
            if seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            if seq.seq_id in self.block_manager.tables:
                self.block_manager.free(seq)
            if seq.on_executor:
                removed.append(seq.seq_id)
                seq.on_executor = False
        self._to_release.clear()
        return removed

    def _schedule_running(self, step: ScheduledStep) -> bool:
        """Give every running sequence a slot for its next token (preempting the latest
        arrivals when blocks run out), then tokens: decodes first, then prompt chunks."""
        queue = deque(self.running)
        kept: list[Sequence] = []
        preempted = False
        while queue:
            seq = queue.popleft()
            while not self.block_manager.can_append_slot(seq):
                preempted = True
                victim = queue.pop() if queue else seq
                self._preempt(victim, step)
                if victim is seq:
                    break
            else:
                block_id = self.block_manager.append_slot(seq)
                if block_id is not None:
                    step.block_appends.append((seq.seq_id, block_id))
                kept.append(seq)
        self.running = kept
        budget = self.max_num_batched_tokens
        for seq in sorted(kept, key=_is_prefilling):  # stable: arrival order within each kind
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_tokens:
                step.add(seq, num_tokens)
                budget -= num_tokens
        return preempted

    def _schedule_waiting(self, step: ScheduledStep) -> None:
        """Admit waiting prompts in arrival order; the last one admitted may get only a
        chunk of its prompt this step (chunked prefill), the rest in later steps."""
        budget = self.max_num_batched_tokens - sum(step.num_tokens)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            seq.on_executor = True
            self.running.append(seq)
            step.new_seqs.append(seq)
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            step.add(seq, num_tokens)
            budget -= num_tokens

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        """Recompute preemption: drop the KV, requeue at the front with all tokens so far."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.on_executor = False
        step.removed.append(seq.seq_id)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


def _is_prefilling(seq: Sequence) -> bool:
    return seq.num_tokens - seq.num_computed_tokens > 1
