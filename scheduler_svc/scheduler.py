"""Continuous batching: who computes what in the next step.

Policy only; the block manager owns the blocks. Each step first lets every running
sequence decode one token (oldest first), preempting the latest arrivals when blocks run
out (swap to CPU or recompute later), then brings swapped groups back, and only then
admits waiting prompts in arrival order while the token, sequence and block budgets allow.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

from pagedserve.common.config import PREEMPTION_MODES
from pagedserve.common.protocol import MAX_SEQ_ID
from pagedserve.scheduler_svc.beam_search import Choice
from pagedserve.scheduler_svc.scheduled_step import ScheduledStep
from pagedserve.scheduler_svc.sequence import Request, Sequence, SequenceStatus
from pagedserve.scheduler_svc.session import ExecutorSession

Group = list[Sequence]  # the sequences of one request that move together


class Scheduler:
    """Queues: ``waiting`` sequences, ``running`` sequences, ``swapped`` groups. The running
    sequences of one request form a group, preempted all or nothing: swapped out together
    (their shared blocks stay shared) or, when the CPU pool has no room, each queued again
    to be recomputed on its own.

    Steps are scheduled into the blocks of the executor ``session`` attached, none before
    one is ready. Counters (preemptions, prefix cache) live here, not in the session: the
    metrics scrape them, and they never go backwards while the scheduler lives."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "auto"):
        assert preemption_mode in PREEMPTION_MODES, preemption_mode
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.session: ExecutorSession | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Group] = deque()
        self.preemptions = {"swap": 0, "recompute": 0}
        # Prompt tokens looked up in the prefix cache, and of those, tokens found cached.
        self.prefix_cache_stats = {"queries": 0, "hits": 0}
        self.capped: list[Request] = []  # requests ended for lack of blocks: tell their clients
        self._seq_ids = itertools.count()
        # Finished sequences keep their blocks until the next schedule(): by then the
        # executor has acknowledged the step that last used them, so no block is reused
        # while a step in flight may still write to it.
        self._to_release: list[Sequence] = []
        # Beam forks and chosen tokens decided from the last result, for the next plan.
        self._forks: list[tuple[int, int, int]] = []
        self._append_tokens: list[tuple[int, int]] = []

    @property
    def ready(self) -> bool:
        """Whether an executor session is attached: steps can be scheduled."""
        return self.session is not None

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of device blocks in use; 0 without an executor."""
        return self.session.block_manager.usage if self.session else 0.0

    def attach(self, session: ExecutorSession) -> None:
        """Schedule into a ready executor's blocks from now on."""
        assert self.session is None, "an executor session is attached already: detach it first"
        self.session = session

    def detach(self) -> list[Sequence]:
        """The executor is gone, and every block with it: each sequence it held (running,
        or swapped to its CPU memory) waits to be recomputed from its tokens, ahead of the
        requests that never ran, in arrival order. Finished sequences are forgotten.
        Returns the sequences that wait to be recomputed."""
        finished = set(map(id, self._to_release))
        self._to_release.clear()
        self._forks, self._append_tokens = [], []
        held = [seq for seq in self.running if id(seq) not in finished]
        held += [seq for group in self.swapped for seq in group if id(seq) not in finished]
        self.running, self.swapped = [], deque()
        for seq in held:
            seq.on_executor = False
            seq.candidates = None
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        for request in {id(seq.request): seq.request for seq in held}.values():
            request.num_executor_losses += 1
        held.sort(key=lambda s: (s.request.arrival_time, s.seq_id))
        self.waiting = deque([*held, *(s for s in self.waiting if id(s) not in finished)])
        self.session = None
        return held

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self._to_release)

    def queue_lengths(self) -> dict:
        """Requests (sequence groups, as vLLM counts them) in each queue."""
        return {"running": len({id(seq.request) for seq in self.running}),
                "waiting": len({id(seq.request) for seq in self.waiting}),
                "swapped": len(self.swapped)}

    def add(self, request: Request) -> None:
        """Queue a new request: its samples (n, or best_of) or its first beam."""
        num_samples = 1 if request.params.beam_width > 1 else (
            request.params.best_of or request.params.n)
        request.seqs = [Sequence(self._next_seq_id(), request.prompt_token_ids,
                                 request, sample_index=i) for i in range(num_samples)]
        # One prefill for all samples: the others are forked from the first.
        request.unforked = request.seqs[1:]
        self.waiting.append(request.seqs[0])

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop, length or abort); its blocks are released at the next step."""
        if seq.is_finished:
            return
        seq.finish(reason, stop_reason)
        self._to_release.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(removed=self._release_finished(), forks=self._forks,
                             append_tokens=self._append_tokens)
        self._forks, self._append_tokens = [], []
        for seq in list(self.running):
            self._fork_samples(seq, step)
        preempted = self._schedule_running(step)
        # Swapped groups come back before anything new is admitted.
        if not preempted and self._schedule_swapped(step):
            self._schedule_waiting(step)
        step.drop_edits(set(step.removed))
        return step

    def schedule_ahead(self, in_flight: ScheduledStep,
                       ends: Callable[[Sequence], bool]) -> ScheduledStep | None:
        """The step after ``in_flight``, built while it runs (async scheduling), or None when
        that step depends on its result.

        Only a pure continuation qualifies: every running sequence is in ``in_flight`` and
        samples there, so each decodes the token being sampled now, and nothing waits or is
        swapped (admitting them takes the normal path once the pipeline drains). Beams wait
        for the scheduler's choice and samples for their fork, so they never go ahead.
        ``ends(seq)`` says whether the token in flight ends the sequence by its length; a
        stop token is only seen in the result, so a stopped sequence computes one token in
        vain, never read. The executor runs plans in order, so blocks freed here (finished
        sequences) may go to others in this plan: the step in flight writes them first.
        """
        if self.waiting or self.swapped or self._forks or self._append_tokens:
            return None
        live = [(seq, n) for seq, n in zip(in_flight.seqs, in_flight.num_tokens)
                if not seq.is_finished]
        if len(live) != sum(not seq.is_finished for seq in self.running):
            return None  # a running sequence sits this step out (beams, token budget)
        for seq, num_tokens in live:
            request = seq.request
            if (request.beam is not None or request.unforked
                    or seq.num_computed_tokens + num_tokens != seq.num_tokens):
                return None
        going_on = [seq for seq, _ in live if not ends(seq)]
        bm = self.session.block_manager
        if not going_on or not bm.can_append_slots(going_on, ahead=1):
            return None  # nothing to run, or a preemption to decide: after the result
        step = ScheduledStep(removed=self._release_finished())
        for seq in going_on:
            step.record(seq, bm.append_slot(seq, ahead=1))
            step.add(seq, 1)
        return step

    def update(self, step: ScheduledStep, execute_ms: float = 0.0,
               block_ops_ms: float = 0.0) -> None:
        """The executor acknowledged ``step``: its tokens are now in the cache. A sequence
        that finished meanwhile (aborted, or stopped by the token of the step before) is
        left alone: what it computed is never used."""
        bm, cost_model = self.session.block_manager, self.session.cost_model
        for seq, num_tokens in zip(step.seqs, step.num_tokens):
            if seq.is_finished:
                continue
            seq.num_computed_tokens += num_tokens
            bm.cache_computed_blocks(seq)
        if cost_model is not None:
            cost_model.observe(sum(step.num_tokens), execute_ms,
                               len(step.swap_out) + len(step.swap_in), block_ops_ms)

    def advance_beams(self, request: Request) -> None:
        """Every live beam has its candidates: carry out the beam search's choice. A beam
        chosen once continues in place, chosen again it is forked, not chosen it is freed."""
        beams, search = request.seqs, request.beam
        choices = search.step(beams)
        next_beams: list[tuple[Sequence, Choice]] = []
        for choice in choices:
            parent = choice.parent
            seq = parent
            if any(chosen is parent for chosen, _ in next_beams):
                seq = parent.fork(self._next_seq_id())
                self._fork(parent, seq, self._forks)
            next_beams.append((seq, choice))
        # Tokens go on after every fork: a fork copies its parent without the new token
        # (the executor applies forks before append_tokens too).
        for seq, choice in next_beams:
            entry = search.position_logprobs(seq, choice.token_id, choice.logprob)
            seq.append_token(choice.token_id, choice.logprob)
            if entry is not None:
                seq.logprobs.append(entry)
            seq.candidates = None
            self._append_tokens.append((seq.seq_id, choice.token_id))
        survivors = [seq for seq, _ in next_beams]
        for beam in beams:
            if not any(beam is seq for seq in survivors):
                self.finish(beam, "stop")  # freed: pruned, or the search is over
        request.seqs = survivors or beams

    def _next_seq_id(self) -> int:
        # Ids wrap within the int32 the wire carries; a sequence lives far shorter than 2**31.
        return next(self._seq_ids) % (MAX_SEQ_ID + 1)

    def _fork(self, parent: Sequence, child: Sequence, forks: list) -> None:
        """``child`` continues from ``parent``, sharing its blocks until it writes."""
        self.session.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        child.on_executor = True
        forks.append((child.seq_id, parent.seq_id, child.sample_index))
        self.running.append(child)

    def _fork_samples(self, seq: Sequence, step: ScheduledStep) -> Group:
        """Parallel sampling: once the first sample has computed all of its prompt but the
        last token, fork the others from it; each computes the last token and draws its
        own first token. Returns the samples that run now."""
        request = seq.request
        if not request.unforked or seq.sample_index != 0 or seq.num_pending_tokens:
            return [seq]
        forked, request.unforked = request.unforked, []
        for child in forked:
            self._fork(seq, child, step.forks)
        return [seq, *forked]

    def _release_finished(self) -> list[int]:
        removed = []
        finished = set(map(id, self._to_release))
        self.running = [seq for seq in self.running if id(seq) not in finished]
        self.waiting = deque(seq for seq in self.waiting if id(seq) not in finished)
        groups = [[seq for seq in group if id(seq) not in finished] for group in self.swapped]
        self.swapped = deque(group for group in groups if group)
        for seq in self._to_release:
            self.session.block_manager.free(seq)
            if seq.on_executor:
                removed.append(seq.seq_id)
                seq.on_executor = False
        self._to_release.clear()
        return removed

    def _running_groups(self) -> list[Group]:
        """The running sequences grouped by request, oldest request first."""
        groups: dict[int, Group] = {}
        for seq in sorted(self.running, key=lambda s: (s.request.arrival_time, s.seq_id)):
            groups.setdefault(id(seq.request), []).append(seq)
        return list(groups.values())

    def _schedule_running(self, step: ScheduledStep) -> bool:
        """Give every running group slots for its next tokens (preempting the latest
        arrivals when blocks run out), then tokens: decodes first, then prompt chunks."""
        preempted = False
        bm = self.session.block_manager
        pending = [(seq, seq.num_pending_tokens) for seq in self.running]
        needy = [seq for seq, num_pending in pending if num_pending and bm.needs_block(seq)]
        if bm.can_append_slots(needy):
            # Room for every running sequence (the common case): nobody is preempted.
            for seq in needy:
                step.record(seq, bm.append_slot(seq))
            kept = pending
        else:
            kept, preempted = self._preempt_for_room(step)
        self.running = [seq for seq, _ in kept]
        budget = self.max_num_batched_tokens
        # Decodes first, then prompt chunks; stable: arrival order within each kind.
        for seq, num_pending in sorted(kept, key=lambda entry: entry[1] > 1):
            num_tokens = min(num_pending, budget)
            if num_tokens:
                step.add(seq, num_tokens)
                budget -= num_tokens
        return preempted

    def _preempt_for_room(self, step: ScheduledStep) -> tuple[list[tuple[Sequence, int]], bool]:
        """Groups in arrival order get the slots of their next tokens, preempting the latest
        arrivals until they fit. Returns the kept sequences with their pending tokens."""
        bm = self.session.block_manager
        queue = deque(self._running_groups())
        kept: list[tuple[Sequence, int]] = []
        preempted = False
        while queue:
            group = queue.popleft()
            pending = [(seq, seq.num_pending_tokens) for seq in group]
            # Beams waiting for their siblings' candidates have nothing to compute.
            active = [seq for seq, num_pending in pending if num_pending]
            while not bm.can_append_slots(active):
                if not queue and not kept:
                    self._cap(group)
                    break
                preempted = True
                victim = queue.pop() if queue else group
                self._preempt(victim, step)
                if victim is group:
                    break
            else:
                for seq in active:
                    step.record(seq, bm.append_slot(seq))
                kept += pending
        return kept, preempted

    def _schedule_swapped(self, step: ScheduledStep) -> bool:
        """Swap groups back in, oldest first; True when none is left waiting."""
        budget = self.max_num_batched_tokens - sum(step.num_tokens)
        bm = self.session.block_manager
        while self.swapped and budget > 0:
            group = self.swapped[0]
            if len(self.running) + len(group) > self.max_num_seqs:
                return False
            if not bm.can_swap_in(group):
                return False
            self.swapped.popleft()
            step.swap_in += bm.swap_in(group)
            for seq in group:
                # It arrives as a new sequence with its final table, so only a
                # copy-on-write's data copy goes into the plan, not its table edit.
                append = bm.append_slot(seq)
                if append.cow is not None:
                    step.copies.append(append.cow)
                self._start(seq, step)
            budget = self._add_tokens(group, step, budget)
        return not self.swapped

    def _schedule_waiting(self, step: ScheduledStep) -> None:
        """Admit waiting sequences in arrival order; the last one admitted may get only a
        chunk of its prompt this step (chunked prefill), the rest in later steps."""
        budget = self.max_num_batched_tokens - sum(step.num_tokens)
        bm = self.session.block_manager
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            num_forks = len(seq.request.unforked) if seq.sample_index == 0 else 0
            if len(self.running) + 1 + num_forks > self.max_num_seqs:
                break
            # Prompt logprobs need the logits of every prompt position: no cache hits.
            use_cache = seq.request.params.prompt_logprobs is None
            if not bm.can_allocate(seq, num_forks, use_cache):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            bm.allocate(seq, use_cache)  # counts prefix-cache hits as computed
            if bm.enable_prefix_caching and use_cache:
                self.prefix_cache_stats["queries"] += seq.num_tokens
                self.prefix_cache_stats["hits"] += seq.num_computed_tokens
            self._start(seq, step)
            # A prompt whose all but last token hit the prefix cache forks right away.
            samples = self._fork_samples(seq, step)
            # The forked samples copy-on-write the shared last block; the first sample
            # goes last, so it writes in place and its table (sent whole) is what they forked.
            for sample in reversed(samples[1:]):
                step.record(sample, bm.append_slot(sample))
            budget = self._add_tokens(samples, step, budget)

    def _add_tokens(self, group: Group, step: ScheduledStep, budget: int) -> int:
        for seq in group:
            num_tokens = min(seq.num_pending_tokens, budget)
            if num_tokens:
                step.add(seq, num_tokens)
                budget -= num_tokens
        return budget

    def _start(self, seq: Sequence, step: ScheduledStep) -> None:
        seq.status = SequenceStatus.RUNNING
        seq.on_executor = True
        self.running.append(seq)
        step.start(seq, self.session.block_manager.table(seq.seq_id))

    def _preempt(self, group: Group, step: ScheduledStep) -> None:
        """Take a running group off the device: swap its blocks to CPU memory, or drop
        them and recompute later. Either way it continues exactly where it stopped."""
        for seq in group:
            seq.on_executor = False
            step.removed.append(seq.seq_id)
            if seq.candidates is not None:
                # A beam waiting for its siblings recomputes its last token on return, to
                # get its candidates again (its KV is rewritten with the same values).
                seq.candidates = None
                seq.num_computed_tokens = seq.num_tokens - 1
        bm = self.session.block_manager
        if self._should_swap(group):
            step.swap_out += bm.swap_out(group)
            for seq in group:
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            self.preemptions["swap"] += 1
            return
        for seq in reversed(group):
            bm.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        self.preemptions["recompute"] += 1

    def _cap(self, group: Group) -> None:
        """Alone on the device and still out of blocks, the group can never grow: preempting
        it would only bring it back to the same point. It ends here, as at max_model_len."""
        request = group[0].request
        if request.beam is not None:
            request.beam.finish(group, "length")
        for seq in group:
            self.finish(seq, "length")
        self.capped.append(request)

    def _should_swap(self, group: Group) -> bool:
        bm, cost_model = self.session.block_manager, self.session.cost_model
        if not bm.can_swap_out(group):
            return False  # a full CPU pool leaves recompute as the only way
        if len(group) > 1:
            # Sequences sharing blocks swap in every mode, as in the paper: recomputed, each
            # would need its own copy of the shared blocks, and might never fit back at once.
            return True
        if self.preemption_mode != "auto" or cost_model is None:
            return self.preemption_mode == "swap"
        seq = group[0]
        return cost_model.prefers_swap(seq.num_computed_tokens, len(bm.table(seq.seq_id)))

