"""Continuous batching: who computes what in the next step.

Policy only; the block manager owns the blocks. Each step first lets every running
sequence decode one token (oldest first), preempting the latest arrivals when blocks run
out (swap to CPU or recompute later), then brings swapped groups back, and only then
admits waiting prompts in arrival order while the token, sequence and block budgets allow.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.protocol import NewSeq, StepPlan
from scheduler_svc.block_manager import AppendResult, BlockManager
from scheduler_svc.cost_model import PreemptionCostModel
from scheduler_svc.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """What the next plan carries; the service turns it into a ``StepPlan``."""

    removed: list[int] = field(default_factory=list)
    new_seqs: list[Sequence] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    block_appends: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    replace_last: list[tuple[int, int]] = field(default_factory=list)

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
            block_appends=_flat(self.block_appends), swap_out=_flat(self.swap_out),
            swap_in=_flat(self.swap_in), copies=_flat(self.copies),
            replace_last=_flat(self.replace_last))

    def record(self, seq: Sequence, append: AppendResult) -> None:
        """Put what ``append_slot`` did to a running sequence's table into the plan."""
        if append.new_block is not None:
            self.block_appends.append((seq.seq_id, append.new_block))
        if append.cow is not None:
            self.copies.append(append.cow)
            self.replace_last.append((seq.seq_id, append.cow[1]))


PREEMPTION_MODES = ("auto", "swap", "recompute")


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, preemption_mode: str = "auto",
                 cost_model: PreemptionCostModel | None = None):
        assert preemption_mode in PREEMPTION_MODES, preemption_mode
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.cost_model = cost_model
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.preemptions = {"swap": 0, "recompute": 0}
        # Finished sequences keep their blocks until the next schedule(): by then the
        # executor has acknowledged the step that last used them, so no block is reused
        # while a step in flight may still write to it.
        self._to_release: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self._to_release)

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
        # Swapped groups come back before anything new is admitted.
        if not preempted and self._schedule_swapped(step):
            self._schedule_waiting(step)
        return step

    def update(self, step: ScheduledStep, execute_ms: float = 0.0,
               block_ops_ms: float = 0.0) -> None:
        """The executor acknowledged ``step``: its tokens are now in the cache."""
        for seq, num_tokens in zip(step.seqs, step.num_tokens):
            seq.num_computed_tokens += num_tokens
            self.block_manager.cache_computed_blocks(seq)
        if self.cost_model is not None:
            self.cost_model.observe(sum(step.num_tokens), execute_ms,
                                    len(step.swap_out) + len(step.swap_in), block_ops_ms)

    def _release_finished(self) -> list[int]:
        removed = []
        for seq in self._to_release:
            for queue in (self.running, self.waiting, self.swapped):
                if seq in queue:
                    queue.remove(seq)
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
                step.record(seq, self.block_manager.append_slot(seq))
                kept.append(seq)
        self.running = kept
        budget = self.max_num_batched_tokens
        for seq in sorted(kept, key=_is_prefilling):  # stable: arrival order within each kind
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_tokens:
                step.add(seq, num_tokens)
                budget -= num_tokens
        return preempted

    def _schedule_swapped(self, step: ScheduledStep) -> bool:
        """Swap groups back in, oldest first; True when none is left waiting."""
        budget = self.max_num_batched_tokens - sum(step.num_tokens)
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            # Room for its blocks and for the slot of its next token.
            num_blocks = len(self.block_manager.tables[seq.seq_id])
            if self.block_manager.device.num_free < num_blocks + 1:
                return False
            self.swapped.popleft()
            step.swap_in += self.block_manager.swap_in([seq])
            # It arrives as a new sequence with its final table, so only a copy-on-write's
            # data copy goes into the plan, not its table edit.
            append = self.block_manager.append_slot(seq)
            if append.cow is not None:
                step.copies.append(append.cow)
            self._start(seq, step)
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            step.add(seq, num_tokens)
            budget -= num_tokens
        return not self.swapped

    def _start(self, seq: Sequence, step: ScheduledStep) -> None:
        seq.status = SequenceStatus.RUNNING
        seq.on_executor = True
        self.running.append(seq)
        step.new_seqs.append(seq)

    def _schedule_waiting(self, step: ScheduledStep) -> None:
        """Admit waiting prompts in arrival order; the last one admitted may get only a
        chunk of its prompt this step (chunked prefill), the rest in later steps."""
        budget = self.max_num_batched_tokens - sum(step.num_tokens)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.block_manager.allocate(seq)  # counts prefix-cache hits as computed
            self._start(seq, step)
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            step.add(seq, num_tokens)
            budget -= num_tokens

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        """Take a running sequence off the device: swap its blocks to CPU memory, or drop
        them and recompute later. Either way it continues exactly where it stopped."""
        seq.on_executor = False
        step.removed.append(seq.seq_id)
        if self._should_swap(seq):
            step.swap_out += self.block_manager.swap_out([seq])
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            self.preemptions["swap"] += 1
            return
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.preemptions["recompute"] += 1

    def _should_swap(self, seq: Sequence) -> bool:
        if self.preemption_mode == "recompute" or not self.block_manager.can_swap_out([seq]):
            return False  # a full CPU pool leaves recompute as the only way
        if self.preemption_mode == "swap" or self.cost_model is None:
            return self.preemption_mode == "swap"
        num_blocks = len(self.block_manager.tables[seq.seq_id])
        return self.cost_model.prefers_swap(seq.num_computed_tokens, num_blocks)


def _is_prefilling(seq: Sequence) -> bool:
    return seq.num_tokens - seq.num_computed_tokens > 1


def _flat(pairs: list[tuple[int, int]]) -> list[int]:
    return [x for pair in pairs for x in pair]
