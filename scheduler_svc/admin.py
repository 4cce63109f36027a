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

COMMANDS = ("pool", "seqs", "seq", "stats", "health", "reset_prefix_cache")


class AdminError(ValueError):
    """A bad admin request; its message is the reply."""


class AdminHandler:
    def __init__(self, service):
        self.service = service

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
        service = self.service
        info = service.executor_info
        return {"status": "ready" if service.ready else "waiting_for_executor",
                "executor": None if info is None else {
                    "model": info.model, "dtype": info.dtype, "device": info.device},
                "executors_lost": service.executors_lost,
                "live_requests": len(service.frontend.requests),
                "max_model_len": service.max_model_len}

    def reset_prefix_cache(self, request: dict) -> dict:
        bm = self.service.scheduler.block_manager
        if bm is None:
            raise AdminError("no executor is ready yet: there is no prefix cache")
        if not bm.reset_prefix_cache():
            raise AdminError("requests hold blocks: reset the prefix cache when idle")
        return {"reset": True}

    def pool(self, request: dict) -> dict:
        """Both pools' counts and maps, token slots, prefix cache, preemptions, queues."""
        scheduler = self.service.scheduler
        bm = scheduler.block_manager
        if bm is None:
            empty = {"total": 0, "free": 0, "used": 0, "cached": 0, "shared": 0,
                     "refcounts": {}}
            views = {"device": empty, "cpu": empty, "prefix_cache": {"queries": 0, "hits": 0},
                     "slots": {"used": 0, "allocated": 0}, "map": {"device": "", "cpu": ""}}
        else:
            views = {**bm.stats(), "slots": bm.slots(scheduler.running),
                     "map": bm.block_states()}
        return {"ready": bm is not None, "block_size": self.service.config.block_size,
                **views, **scheduler.queue_lengths(),
                "preemptions": dict(scheduler.preemptions)}

    def seqs(self, request: dict) -> dict:
        """Every running, swapped and waiting sequence with its block table and count."""
        tables = self._tables()
        return {"seqs": [{**_describe(seq), "num_blocks": len(tables.get(seq.seq_id, [])),
                          "block_table": tables.get(seq.seq_id, [])}
                         for seq in self._all_seqs()]}

    def seq(self, request: dict) -> dict:
        """One sequence's block table: each block's refcount and fill (tokens it holds)."""
        seq_id = request.get("seq_id")
        seq = next((s for s in self._all_seqs() if s.seq_id == seq_id), None)
        if seq is None:
            raise AdminError(f"no live sequence with id {seq_id!r}: "
                             f"`pagedserve seqs` lists them")
        bm = self.service.scheduler.block_manager
        if bm is None:  # no executor (yet, or it was lost): nothing holds blocks
            return {**_describe(seq), "pool": None, "blocks": []}
        table = self._tables().get(seq.seq_id, [])
        on_cpu = seq.seq_id in bm.swapped
        refcounts = (bm.cpu if on_cpu else bm.device).refcounts
        size = bm.block_size
        blocks = [{"block_id": block_id, "refcount": refcounts[block_id],
                   "fill": max(0, min(size, seq.num_tokens - i * size))}
                  for i, block_id in enumerate(table)]
        return {**_describe(seq), "pool": "cpu" if on_cpu else "device", "blocks": blocks}

    def stats(self, request: dict) -> dict:
        return self.service.metrics.stats(time.monotonic())

    def _tables(self) -> dict[int, list[int]]:
        bm = self.service.scheduler.block_manager
        return bm.tables if bm else {}

    def _all_seqs(self):
        scheduler = self.service.scheduler
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
