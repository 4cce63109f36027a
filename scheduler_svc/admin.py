"""The admin socket: read-only JSON views of the block pools and sequences.

A request is a JSON object ``{"cmd": "pool" | "seqs" | "health"}``; the reply is JSON.
"""
from __future__ import annotations

import json


class AdminHandler:
    def __init__(self, service):
        self.service = service

    def handle(self, payload: bytes) -> bytes:
        try:
            cmd = json.loads(payload).get("cmd")
        except (ValueError, AttributeError):
            return _reply({"error": "admin requests are JSON objects like {\"cmd\": \"pool\"}"})
        handler = {"pool": self.pool, "seqs": self.seqs, "health": self.health}.get(cmd)
        if handler is None:
            return _reply({"error": f"unknown admin command {cmd!r}; "
                                    f"expected pool, seqs or health"})
        return _reply(handler())

    def health(self) -> dict:
        service = self.service
        info = service.executor_info
        return {"status": "ready" if service.ready else "waiting_for_executor",
                "executor": None if info is None else {
                    "model": info.model, "dtype": info.dtype, "device": info.device},
                "max_model_len": service.max_model_len}

    def pool(self) -> dict:
        scheduler = self.service.scheduler
        bm = scheduler.block_manager
        empty = {"total": 0, "free": 0, "used": 0}
        stats = bm.stats() if bm else {"device": {**empty, "cached": 0, "shared": 0},
                                       "cpu": empty,
                                       "prefix_cache": {"queries": 0, "hits": 0}}
        return {"ready": bm is not None, "block_size": self.service.config.block_size, **stats,
                # Requests (sequence groups), as vLLM counts them.
                "running": len({id(seq.request) for seq in scheduler.running}),
                "waiting": len({id(seq.request) for seq in scheduler.waiting}),
                "swapped": len(scheduler.swapped),
                "preemptions": dict(scheduler.preemptions)}

    def seqs(self) -> dict:
        scheduler = self.service.scheduler
        tables = scheduler.block_manager.tables if scheduler.block_manager else {}
        seqs = [*scheduler.running, *(seq for group in scheduler.swapped for seq in group),
                *scheduler.waiting]
        return {"seqs": [{"seq_id": seq.seq_id, "request_id": seq.request.request_id,
                          "status": seq.status.value, "num_tokens": seq.num_tokens,
                          "num_computed_tokens": seq.num_computed_tokens,
                          "block_table": tables.get(seq.seq_id, [])} for seq in seqs]}



def _reply(data: dict) -> bytes:
    return json.dumps(data).encode()
