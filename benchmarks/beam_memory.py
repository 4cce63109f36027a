"""Blocks saved by sharing among beams (paper, Fig. 15), with real beam dynamics.

Which beams survive, and so how long they share their blocks, depends on the model's
scores: this part runs a model. Requests go through the real engine (scheduler, block
manager, beam search) and the real model runner in one process, with the KV pool large
enough that nothing is preempted. The prompts are Alpaca-style instructions written for
this benchmark (no dataset can be downloaded here); output limits are drawn like the
Alpaca-like trace's output lengths.
"""
from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import torch

from pagedserve.benchmarks.memory import scheduler_over, sharing_saves
from pagedserve.common import protocol as p
from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.model import ModelConfig, load_model
from pagedserve.executor_svc.model_runner import ModelRunner
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.engine import Engine
from pagedserve.scheduler_svc.output_processor import OutputProcessor
from pagedserve.scheduler_svc.sequence import Request
from pagedserve.scheduler_svc.tokenizer import Tokenizer

INSTRUCTIONS = [
    "Give three tips for staying healthy.", "What are the three primary colors?",
    "Describe the structure of an atom.", "How can we reduce air pollution?",
    "Explain why the sky is blue.", "Write a short story about a lost key.",
    "Name five fruits that are rich in vitamin C.", "Summarize the plot of Cinderella.",
    "Suggest a name for a new coffee shop.", "Explain what a black hole is.",
    "List the steps to bake bread.", "Why is exercise important for the brain?",
    "Write a haiku about autumn leaves.", "What is the capital of Australia?",
    "Compare cats and dogs as pets.", "Explain how a rainbow forms.",
    "Give an example of a renewable energy source.", "Describe a sunset over the ocean.",
    "How does a computer store information?", "Translate 'good morning' into French.",
    "What causes the seasons on Earth?", "Write a polite email declining an invitation.",
    "Explain the rules of chess briefly.", "Why do leaves change color in the fall?",
    "Name three famous painters and one work of each.", "How do vaccines work?",
    "Describe your ideal weekend.", "What is the difference between weather and climate?",
    "Give advice to a student starting university.", "Explain what photosynthesis is.",
    "Write a limerick about a cat.", "What are the benefits of reading books?",
]
TEMPLATE = "### Instruction:\n{}\n\n### Response:\n"
OUTPUT_MEAN, OUTPUT_SIGMA = 58.45, 0.7  # the Alpaca-like trace's output lengths


def beam_search_rows(model_dir: Path, widths: tuple[int, ...], num_requests: int,
                     concurrency: int, block_size: int, seed: int) -> list[dict]:
    """One row per beam width, shaped like the parallel sampling rows."""
    tokenizer = Tokenizer.from_model_dir(model_dir)
    config = ModelConfig.from_model_dir(model_dir)
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    rng = random.Random(seed)
    prompts = [tokenizer.encode(TEMPLATE.format(rng.choice(INSTRUCTIONS)))
               for _ in range(num_requests)]
    max_tokens = [min(max(round(rng.lognormvariate(_mu(), OUTPUT_SIGMA)), 1), 256)
                  for _ in range(num_requests)]
    longest = max(map(len, prompts)) + max(max_tokens)
    num_blocks = concurrency * max(widths) * (-(-longest // block_size) + 1)
    cache = CacheEngine(config, block_size, num_blocks, 0, torch.float32, "cpu")
    runner = ModelRunner(model, cache, block_size)
    processor = OutputProcessor(tokenizer, lambda: config.max_position_embeddings)
    return [{"kind": "beam search", "width": width,
             "saved": beam_search_savings(runner, processor, prompts, max_tokens, width,
                                          concurrency)} for width in widths]


def beam_search_savings(runner: ModelRunner, processor: OutputProcessor,
                        prompts: list[list[int]], max_tokens: list[int], width: int,
                        concurrency: int) -> float:
    """1 - blocks in use / blocks in all tables, averaged over the steps with
    ``concurrency`` requests in flight; a finished request makes room for the next."""
    bm = BlockManager(runner.block_size, runner.cache.num_device_blocks, 0, watermark=0.0,
                      enable_prefix_caching=False)
    engine = Engine(scheduler_over(bm, processor.max_model_len(), concurrency * width, 4096),
                    processor)
    pending = [Request(str(i), b"bench", SamplingParams(beam_width=width, max_tokens=limit),
                       ids, stream=False)
               for i, (ids, limit) in enumerate(zip(prompts, max_tokens))]
    live: list[Request] = []
    saved = []
    while pending or live:
        while pending and len(live) < concurrency:
            live.append(pending.pop(0))
            engine.add(live[-1])
        scheduled = engine.schedule()
        if scheduled is None:
            raise RuntimeError("the engine stopped with requests unfinished")
        step, plan = scheduled
        blocks = bm.snapshot()
        if len(live) == concurrency and blocks.tables:
            saved.append(sharing_saves(blocks))
        engine.process(step, runner.execute(p.decode(p.encode(plan))))
        live = [request for request in live if not request.is_finished]
    while (scheduled := engine.schedule()) is not None:  # the last removals reach the runner
        engine.process(scheduled[0], runner.execute(p.decode(p.encode(scheduled[1]))))
    return statistics.fmean(saved)


def _mu() -> float:
    return math.log(OUTPUT_MEAN) - OUTPUT_SIGMA ** 2 / 2  # so that the mean is OUTPUT_MEAN
