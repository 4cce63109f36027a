"""Fixtures shared by the test suite."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pagedserve.common.import_path import drop_checkout_from_path

# `python -m pytest` from the checkout's root puts the root on sys.path; test modules import
# transformers, which imports Hugging Face's `kernels` (5.25 on) and must not get ours.
drop_checkout_from_path()

# Without a GPU the Triton kernels run in triton's interpreter on CPU tensors. The variable
# must be set before any kernel is defined, that is before ``kernels`` is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF model directory, converted once into the pagedserve cache
    (``$PAGEDSERVE_CACHE`` or ``~/.cache/pagedserve``) and reused by later runs."""
    # Imported here, so that tests without the model never import the executor.
    from pagedserve.executor_svc.prepare_model import prepare_model

    return prepare_model()
