"""Our top-level ``kernels`` must not pass for the PyPI ``kernels`` that transformers probes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils.import_utils import is_kernels_available

from tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    assert Path(importlib.util.find_spec("kernels").origin).parent == REPO / "kernels"
    is_kernels_available.cache_clear()  # probe afresh, with ours importable
    assert not is_kernels_available()


def test_transformers_still_loads_and_runs_a_model(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path))
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()
