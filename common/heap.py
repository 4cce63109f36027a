"""The garbage collector in a long-running service: what start-up built is never garbage."""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then move every object that survived into the permanent generation,
    which no collection walks again. The model's modules, the tokenizer, the config live as
    long as the process: without this every full collection in the middle of serving walks
    them all (vLLM's engine does the same after its start-up). Call it once start-up is
    done; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()
