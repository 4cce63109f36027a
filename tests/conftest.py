"""Fixtures shared by the test suite."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF model directory, converted once into the pagedserve cache
    (``$PAGEDSERVE_CACHE`` or ``~/.cache/pagedserve``) and reused by later runs."""
    # Imported here, so that tests without the model never import the executor.
    from executor_svc.prepare_model import prepare_model

    return prepare_model()
