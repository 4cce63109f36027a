"""Paged attention kernels (Triton) and their float64 pure-torch references.

- ``paged_decode_attention``: one new token per sequence over its paged context; a one-pass
  kernel for short contexts, split-K with a log-sum-exp reduce for long ones.
- ``paged_prefill_attention``: the packed new tokens of many sequences, causal, over each
  sequence's cached prefix and themselves.
- ``rope_write_kv``: RoPE of the new tokens' queries and keys, and their K/V written into
  their cache slots (-1: skip), in one launch; ``add_rms_norm`` and ``silu_mul``: a decoder
  layer's other elementwise work; ``greedy``: argmax sampling (``layer_ops``).
- ``copy_blocks``: whole blocks of every layer copied in one launch (copy-on-write, swaps).

On CPU tensors they run only in triton's interpreter (``TRITON_INTERPRET=1`` set before this
package is imported).

transformers probes for the unrelated PyPI package ``kernels`` by import name and takes it as
installed only at a version in its supported range. Ours has no ``__version__`` and ships in the
``pagedserve`` distribution (0.x), so the probe says "not installed"; tests/test_kernels_package.py
holds it to that. Keep this module free of a ``__version__``.
"""
from .cache_ops import copy_blocks
from .decode import paged_decode_attention
from .layer_ops import add_rms_norm, greedy, rope_write_kv, silu_mul
from .prefill import paged_prefill_attention
from .reference import (bf16_attention_tolerance, paged_attention_reference,
                        reshape_and_cache_reference)

__all__ = ["add_rms_norm", "bf16_attention_tolerance", "copy_blocks", "greedy",
           "paged_attention_reference", "paged_decode_attention", "paged_prefill_attention",
           "reshape_and_cache_reference", "rope_write_kv", "silu_mul"]
