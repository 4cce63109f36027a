"""Paged attention kernels and their float64 pure-torch references.

This package has no ``__version__`` on purpose: transformers probes for the unrelated PyPI package
``kernels`` by version, and a module without one reads to it as "not installed".
"""
from .reference import paged_attention_reference, reshape_and_cache_reference

__all__ = ["paged_attention_reference", "reshape_and_cache_reference"]
