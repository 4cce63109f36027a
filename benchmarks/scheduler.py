"""Scheduler cost per step: ``schedule()`` plus plan encoding, at N running decode sequences;
and what the service does with each step's result.

    python -m pagedserve.benchmarks.scheduler [--seqs 256] [--steps 500] [--json]
    python -m pagedserve.benchmarks.scheduler --seqs 32 --results [--stream]

No executor: after each step every sequence "samples" a token, as the executor would report,
so the next step is again a pure decode step for all of them. Reports the median and p90 of
``schedule()`` + ``to_plan`` + ``encode`` per step, ``update()`` separately, and the plan's
bytes per sequence on the wire (the protocol's compactness: one block id only when a table
crosses a block boundary).

``--results``: the service's work on a step's result instead, as the step loop does it
(``Engine.process``: detokenizing and stop checks; the metrics; the outputs of the requests
that stream or finished, encoded in one message as for one client), on the default model's
tokenizer, with text tokens as results; requests of ``--max-tokens`` tokens, a new one
admitted for each that finishes. On two cores this CPU time is taken from the executor's threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from pagedserve.common import protocol as p
from pagedserve.common.config import default_model_dir
from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.frontend import Frontend
from pagedserve.scheduler_svc.metrics import Metrics
from pagedserve.scheduler_svc.output_processor import OutputProcessor
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession
from pagedserve.scheduler_svc.tokenizer import Tokenizer

PROMPT_LEN = 100


def _scheduler(num_seqs: int, tokens_per_seq: int, block_size: int) -> Scheduler:
    """A scheduler over a ready executor's pool with room for ``num_seqs`` sequences of
    ``tokens_per_seq`` tokens each."""
    blocks_per_seq = -(-tokens_per_seq // block_size)
    bm = BlockManager(block_size, num_seqs * blocks_per_seq + 64, 0)
    scheduler = Scheduler(num_seqs, max(num_seqs, PROMPT_LEN) * num_seqs)
    scheduler.attach(ExecutorSession(bm, ContextLimit(bm.max_seq_len, "the pool holds no more")))
    return scheduler


def run(num_seqs: int, num_steps: int, block_size: int = 16) -> dict:
    scheduler = _scheduler(num_seqs, PROMPT_LEN + num_steps + 1, block_size)
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


def run_results(num_seqs: int, num_steps: int, max_tokens: int = 128, stream: bool = False,
                block_size: int = 16) -> dict:
    """The step loop's work on each step's result at ``num_seqs`` running sequences (see the
    module's docstring): the median and p90 per step, in ms."""
    model_dir = default_model_dir()
    tokenizer = Tokenizer.from_model_dir(model_dir)
    text = tokenizer.encode("The capital of France is Paris. It is known for the Eiffel "
                            "Tower, its museums and its café culture; naïve visitors "
                            "queue for hours.", add_special_tokens=False)
    scheduler = _scheduler(num_seqs, PROMPT_LEN + max_tokens + 1, block_size)
    max_model_len = scheduler.session.block_manager.max_seq_len
    engine = Engine(scheduler, OutputProcessor(tokenizer, lambda: max_model_len))
    frontend = Frontend(tokenizer, tokenizer.vocab_size, lambda: max_model_len, num_seqs)
    metrics = Metrics(model_dir.name)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True).to_dict()
    admitted = 0

    def admit() -> None:
        nonlocal admitted
        prompt = np.array([(admitted * 7 + i) % 20000 + 100 for i in range(PROMPT_LEN)],
                          np.int32)
        engine.add(frontend.create(b"bench", p.GenerateRequest(
            request_id=str(admitted), params=params, stream=stream, prompt_token_ids=prompt)))
        admitted += 1

    for _ in range(num_seqs):
        admit()
    process_ms, finished, messages = [], 0, 0
    for step_no in range(num_steps):
        step = scheduler.schedule()
        seq_ids = [seq.seq_id for seq, n in zip(step.seqs, step.num_tokens)
                   if seq.num_computed_tokens + n == seq.num_tokens]
        tokens = [text[(step_no + i) % len(text)] for i in range(len(seq_ids))]
        result = p.StepResult(step=step_no, seq_ids=np.array(seq_ids, np.int32),
                              token_ids=np.array(tokens, np.int32),
                              logprobs=np.full(len(seq_ids), -0.5, np.float32))
        start = time.perf_counter()
        requests = engine.process(step, result)
        metrics.observe(requests, time.monotonic())
        outputs = [frontend.output(request) for request in requests
                   if request.stream or request.is_finished]
        if outputs:  # one client: one message, as ClientLink.send_outputs sends it
            p.encode(outputs[0] if len(outputs) == 1 else p.OutputBatch(outputs))
            messages += len(outputs)
        process_ms.append((time.perf_counter() - start) * 1e3)
        for request in requests:
            if request.is_finished:
                finished += 1
                admit()
    return {"seqs": num_seqs, "steps": num_steps, "stream": stream, "finished": finished,
            "messages": messages,
            "process_ms_median": statistics.median(process_ms),
            "process_ms_p90": statistics.quantiles(process_ms, n=10)[-1]}


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
    parser.add_argument("--results", action="store_true",
                        help="Time the work on each step's result instead.")
    parser.add_argument("--stream", action="store_true", help="With --results: streaming "
                        "requests (an output message per step each).")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.results:
        result = run_results(args.seqs, args.steps, args.max_tokens, args.stream)
        print(json.dumps(result) if args.json else
              f"{result['seqs']} running sequences, {result['steps']} steps "
              f"({'streaming' if args.stream else 'not streaming'}): the result's processing "
              f"{result['process_ms_median']:.3f} ms median (p90 "
              f"{result['process_ms_p90']:.3f})")
        return
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
