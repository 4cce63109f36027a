"""Scheduler cost per step: ``schedule()`` plus plan encoding, at N running decode sequences.

    python -m pagedserve.benchmarks.scheduler [--seqs 256] [--steps 500] [--json]

No executor: after each step every sequence "samples" a token, as the executor would report,
so the next step is again a pure decode step for all of them. Reports the median and p90 of
``schedule()`` + ``to_plan`` + ``encode`` per step, ``update()`` separately, and the plan's
bytes per sequence on the wire (the protocol's compactness: one block id only when a table
crosses a block boundary).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from pagedserve.common import protocol as p
from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession

PROMPT_LEN = 100


def run(num_seqs: int, num_steps: int, block_size: int = 16) -> dict:
    blocks_per_seq = -(-(PROMPT_LEN + num_steps + 1) // block_size)
    bm = BlockManager(block_size, num_seqs * blocks_per_seq + 64, 0)
    scheduler = Scheduler(num_seqs, max(num_seqs, PROMPT_LEN) * num_seqs)
    scheduler.attach(ExecutorSession(bm, ContextLimit(bm.max_seq_len, "the pool holds no more")))
    for i in range(num_seqs):
        prompt = list(range(1000 + i, 1000 + i + PROMPT_LEN))  # no two share a prefix
        scheduler.add(Request(str(i), b"bench", SamplingParams(max_tokens=10**6), prompt,
                              stream=False))
    _sample(scheduler, scheduler.schedule())  # the prefill of every prompt
    schedule_ms, update_ms, plan_bytes = [], [], []
    for step_no in range(num_steps):
        start = time.perf_counter()
        step = scheduler.schedule()
        data = p.encode(step.to_plan(step_no))
        scheduled = time.perf_counter()
        _sample(scheduler, step)
        schedule_ms.append((scheduled - start) * 1e3)
        update_ms.append((time.perf_counter() - scheduled) * 1e3)
        plan_bytes.append(len(data))
    return {"seqs": num_seqs, "steps": num_steps,
            "schedule_encode_ms_median": statistics.median(schedule_ms),
            "schedule_encode_ms_p90": statistics.quantiles(schedule_ms, n=10)[-1],
            "update_ms_median": statistics.median(update_ms),
            "plan_bytes_per_seq": statistics.fmean(plan_bytes) / num_seqs}


def _sample(scheduler: Scheduler, step) -> None:
    """What the scheduler does with a result: acknowledge, then append each sampled token."""
    scheduler.update(step)
    for seq in step.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(5, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.seqs, args.steps)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['seqs']} running decode sequences, {result['steps']} steps: "
          f"schedule + encode {result['schedule_encode_ms_median']:.3f} ms median "
          f"(p90 {result['schedule_encode_ms_p90']:.3f}), update "
          f"{result['update_ms_median']:.3f} ms, plan {result['plan_bytes_per_seq']:.2f} "
          f"bytes per sequence")


if __name__ == "__main__":
    main()
