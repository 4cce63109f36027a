"""Paged attention kernels and their float64 pure-torch references.

transformers probes for the unrelated PyPI package ``kernels`` by import name and takes it as
installed only at a version in its supported range. Ours has no ``__version__`` and ships in the
``pagedserve`` distribution (0.x), so the probe says "not installed"; tests/test_kernels_package.py
holds it to that. Keep this module free of a ``__version__``.
"""
from .reference import paged_attention_reference, reshape_and_cache_reference

__all__ = ["paged_attention_reference", "reshape_and_cache_reference"]
