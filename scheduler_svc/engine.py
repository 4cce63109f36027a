"""The scheduler's core without sockets: requests in, step plans out, step results in.

The service wraps it in ZeroMQ; tests and benchmarks drive it in process with a model
runner. ``schedule`` builds a step when none is in flight; ``schedule_ahead`` builds the next
decode step while one is (async scheduling). Results are processed in step order.
"""
from __future__ import annotations

from pagedserve.common import protocol as p
from pagedserve.scheduler_svc.output_processor import OutputProcessor
from pagedserve.scheduler_svc.scheduled_step import ScheduledStep
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request


class Engine:
    """The scheduler and the output processor together: what the service drives each step."""

    def __init__(self, scheduler: Scheduler, processor: OutputProcessor):
        self.scheduler = scheduler
        self.processor = processor
        self.step_count = 0

    def add(self, request: Request) -> None:
        if request.params.beam_width > 1:
            request.beam = self.processor.beam_search(request)
        self.scheduler.add(request)
        for seq in request.seqs:
            self.processor.start(seq)

    def abort(self, request: Request) -> None:
        """End every sequence of the request; a beam search keeps what it has so far."""
        if request.beam is not None and not request.beam.done:
            request.beam.finish([seq for seq in request.seqs if not seq.is_finished], "abort")
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")

    def schedule(self) -> tuple[ScheduledStep, p.StepPlan] | None:
        """The next step and its plan, or None when there is nothing to send."""
        step = self.scheduler.schedule()
        if step.is_empty and not step.removed:
            return None
        return self._numbered(step)

    def schedule_ahead(self, in_flight: ScheduledStep) -> tuple[ScheduledStep, p.StepPlan] | None:
        """The step after ``in_flight``, built while it runs (``Scheduler.schedule_ahead``),
        or None when it must wait for ``in_flight``'s result."""
        step = self.scheduler.schedule_ahead(
            in_flight, lambda seq: self.processor.at_length(seq, ahead=1))
        return None if step is None else self._numbered(step)

    def _numbered(self, step: ScheduledStep) -> tuple[ScheduledStep, p.StepPlan]:
        self.step_count += 1
        return step, step.to_plan(self.step_count)

    def take_capped(self) -> list[Request]:
        """Requests the scheduler ended for lack of blocks since the last call."""
        capped, self.scheduler.capped = self.scheduler.capped, []
        return capped

    def process(self, step: ScheduledStep, result: p.StepResult) -> list[Request]:
        """Take the executor's result for ``step``; returns the requests with new output."""
        self.scheduler.update(step, result.execute_ms, result.block_ops_ms)
        seqs = {seq.seq_id: seq for seq in step.seqs}
        for scored in result.prompt_logprobs:
            self.processor.keep_prompt_logprobs(seqs[scored.seq_id].request, scored)
        top = {t.seq_id: t for t in result.top_logprobs}
        touched: dict[tuple[bytes, str], Request] = {}
        for sid, token, logprob in zip(result.seq_ids.tolist(), result.token_ids.tolist(),
                                       result.logprobs.tolist()):
            seq = seqs[sid]
            if seq.is_finished:
                continue  # aborted while the step was running
            reason = self.processor.append(seq, token, logprob, top.get(sid))
            if reason is not None:
                self.scheduler.finish(seq, *reason)
            touched[seq.request.key] = seq.request
        for candidates in result.beam_candidates:
            seq = seqs[candidates.seq_id]
            if seq.is_finished:
                continue
            seq.candidates = list(zip(candidates.token_ids.tolist(),
                                      candidates.logprobs.tolist()))
            request = seq.request
            if all(beam.candidates is not None for beam in request.seqs):
                self.scheduler.advance_beams(request)
                touched[request.key] = request
        return list(touched.values())
