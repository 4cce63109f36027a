"""Plans through a model runner in the order they arrive, each step launched and later
finished (``ModelRunner.launch``, ``finish``), and their results in that order.

With ``overlaps`` a launched step stays in flight until the next plan comes or the device is
done with it: a plan that arrives first is launched ahead of it (where
``ModelRunner.can_launch_ahead`` allows; else the step in flight finishes first), so that on a
GPU the host applies plan N + 1 and enqueues its work while step N runs. At most one step is
in flight. Without ``overlaps`` each step finishes as soon as it is launched.
"""
from __future__ import annotations

from pagedserve.common import protocol as p
from pagedserve.executor_svc.model_runner import Launched, ModelRunner


class StepPipeline:
    """``runner``'s steps in order; ``take`` hands over the results due, oldest first."""

    def __init__(self, runner: ModelRunner, overlaps: bool):
        self.runner = runner
        self.overlaps = overlaps
        self.in_flight: Launched | None = None  # launched, its result not yet taken
        self.launched_ahead = 0  # steps launched while the one before was in flight
        self._due: list[p.StepResult] = []

    def submit(self, plan: p.StepPlan) -> None:
        """Launch ``plan``'s step. On its ``PlanError`` nothing of it was applied; the step
        in flight is as it was, or finished (its result due) where ``plan`` could not go
        ahead of it."""
        if self.in_flight is not None and not self.runner.can_launch_ahead(plan):
            self.flush()
        launched = self.runner.launch(plan)
        if self.in_flight is not None:
            self.launched_ahead += 1
            self.flush()  # the step this one went ahead of
        if self.overlaps:
            self.in_flight = launched
        else:
            self._due.append(self.runner.finish(launched))

    def flush(self) -> None:
        """Finish the step in flight, if one is: its result is due."""
        if self.in_flight is not None:
            launched, self.in_flight = self.in_flight, None
            self._due.append(self.runner.finish(launched))

    def take(self) -> list[p.StepResult]:
        """The results due, oldest first, handed over once."""
        due, self._due = self._due, []
        return due
