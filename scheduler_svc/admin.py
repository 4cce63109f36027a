"""The admin socket: read-only JSON views of the block pools and sequences.

A request is a JSON object ``{"cmd": "pool" | "seqs" | "health"}``; the reply is JSON.
"""
from __future__ import annotations

import json

from scheduler_svc.block_pool import BlockPool


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
        return {"ready": bm is not None,
                "block_size": self.service.config.block_size,
                "device": _pool(bm.device if bm else None),
                "cpu": _pool(bm.cpu if bm else None),
                "running": len(scheduler.running),
                "waiting": len(scheduler.waiting),
                "preemptions": {"recompute": scheduler.num_preemptions}}

    def seqs(self) -> dict:
        scheduler = self.service.scheduler
        tables = scheduler.block_manager.tables if scheduler.block_manager else {}
        seqs = list(scheduler.running) + list(scheduler.waiting)
        return {"seqs": [{"seq_id": seq.seq_id, "request_id": seq.request.request_id,
                          "status": seq.status.value, "num_tokens": seq.num_tokens,
                          "num_computed_tokens": seq.num_computed_tokens,
                          "block_table": tables.get(seq.seq_id, [])} for seq in seqs]}


def _pool(pool: BlockPool | None) -> dict:
    if pool is None:
        return {"total": 0, "free": 0, "used": 0}
    return {"total": pool.num_blocks, "free": pool.num_free, "used": pool.num_used}


def _reply(data: dict) -> bytes:
    return json.dumps(data).encode()
