"""The admin socket: JSON views of the block pools, sequences and statistics, and one action.

A request is a JSON object ``{"cmd": "pool" | "seqs" | "seq" | "stats" | "health"}``
(``seq`` also takes ``"seq_id"``); the reply is JSON, ``{"error": ...}`` for a bad request.
Every view costs O(blocks) at most, so the socket can be polled at 10 Hz under load.
``reset_prefix_cache`` forgets every cached prefix (vLLM's endpoint of that name); it is
refused while any sequence holds blocks.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from pagedserve.scheduler_svc.block_snapshot import BlockSnapshot
from pagedserve.scheduler_svc.metrics import Metrics
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Sequence

COMMANDS = ("pool", "seqs", "seq", "stats", "health", "reset_prefix_cache")


class AdminError(ValueError):
    """A bad admin request; its message is the reply."""


@dataclass(frozen=True)
class Health:
    """The service's side of the ``health`` reply."""

    executor: dict | None  # the registered executor's model, dtype and device
    executors_lost: int
    live_requests: int
    max_model_len: int


@dataclass(frozen=True)
class AdminHandler:
    """Answers admin requests from read-only views: the scheduler's queues and counters, the
    blocks of its executor session (a snapshot), the metrics and the service's health."""

    scheduler: Scheduler
    metrics: Metrics
    service_health: Callable[[], Health]
    block_size: int

    def handle(self, payload: bytes) -> bytes:
        try:
            request = json.loads(payload)
            cmd = request.get("cmd")
        except (ValueError, AttributeError):
            return _reply({"error": "admin requests are JSON objects like {\"cmd\": \"pool\"}"})
        if cmd not in COMMANDS:
            return _reply({"error": f"unknown admin command {cmd!r}; "
                                    f"expected one of {', '.join(COMMANDS)}"})
        try:
            return _reply(getattr(self, cmd)(request))
        except AdminError as exc:
            return _reply({"error": str(exc)})

    def health(self, request: dict) -> dict:
        status = "ready" if self.scheduler.ready else "waiting_for_executor"
        return {"status": status, **asdict(self.service_health())}

    def reset_prefix_cache(self, request: dict) -> dict:
        session = self.scheduler.session
        if session is None:
            raise AdminError("no executor is ready yet: there is no prefix cache")
        if not session.block_manager.reset_prefix_cache():
            raise AdminError("requests hold blocks: reset the prefix cache when idle")
        return {"reset": True}

    def pool(self, request: dict) -> dict:
        """Both pools' counts and maps, token slots, prefix cache, preemptions, queues."""
        scheduler, blocks = self.scheduler, self._blocks()
        return {"ready": scheduler.ready, "block_size": self.block_size, **blocks.stats(),
                "prefix_cache": dict(scheduler.prefix_cache_stats),
                "slots": blocks.slots(scheduler.running), "map": blocks.block_states(),
                **scheduler.queue_lengths(), "preemptions": dict(scheduler.preemptions)}

    def seqs(self, request: dict) -> dict:
        """Every running, swapped and waiting sequence with its block table and count."""
        tables = self._blocks().tables
        return {"seqs": [{**_describe(seq), "num_blocks": len(tables.get(seq.seq_id, ())),
                          "block_table": list(tables.get(seq.seq_id, ()))}
                         for seq in self._all_seqs()]}

    def seq(self, request: dict) -> dict:
        """One sequence's block table: each block's refcount and fill (tokens it holds)."""
        seq_id = request.get("seq_id")
        seq = next((s for s in self._all_seqs() if s.seq_id == seq_id), None)
        if seq is None:
            raise AdminError(f"no live sequence with id {seq_id!r}: "
                             f"`pagedserve seqs` lists them")
        return {**_describe(seq), **self._blocks().blocks_of(seq)}

    def stats(self, request: dict) -> dict:
        return self.metrics.stats(time.monotonic())

    def _blocks(self) -> BlockSnapshot:
        """The blocks now; none without an executor (yet, or it was lost)."""
        session = self.scheduler.session
        if session is None:
            return BlockSnapshot.empty(self.block_size)
        return session.block_manager.snapshot()

    def _all_seqs(self) -> Iterator[Sequence]:
        scheduler = self.scheduler
        yield from scheduler.running
        for group in scheduler.swapped:
            yield from group
        yield from scheduler.waiting


def _describe(seq) -> dict:
    return {"seq_id": seq.seq_id, "request_id": seq.request.request_id,
            "status": seq.status.value, "num_tokens": seq.num_tokens,
            "num_computed_tokens": seq.num_computed_tokens}


def _reply(data: dict) -> bytes:
    return json.dumps(data).encode()
