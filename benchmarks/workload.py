"""The shared benchmark workloads (the peers' ``workload.py`` rule, request for request).

Per request, from one ``random.Random(seed)``: prompt length, output length, then the
prompt's token ids i.i.d. uniform in [1000, 48999]. Every request is greedy and ignores
EOS, so it produces exactly its output length. ``fingerprint`` matches the peers' value.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

TOKEN_LO, TOKEN_HI = 1000, 48999


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 1234


WORKLOADS = {
    "mixed": WorkloadSpec(64, (32, 512), (32, 256)),
    "fixed": WorkloadSpec(32, (128, 128), (128, 128)),
}


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def make_requests(workload: str | WorkloadSpec) -> list[BenchRequest]:
    """The requests of a named workload, or of any spec by the same rule."""
    spec = WORKLOADS[workload] if isinstance(workload, str) else workload
    rng = random.Random(spec.seed)
    requests = []
    for _ in range(spec.num_requests):
        prompt_len = rng.randint(*spec.prompt_len)
        output_len = rng.randint(*spec.output_len)
        ids = [rng.randint(TOKEN_LO, TOKEN_HI) for _ in range(prompt_len)]
        requests.append(BenchRequest(ids, output_len))
    return requests


def fingerprint(requests: list[BenchRequest]) -> str:
    digest = hashlib.sha256()
    for i, r in enumerate(requests):
        digest.update(json.dumps([i, r.prompt_token_ids, r.output_len]).encode())
    return digest.hexdigest()[:16]
