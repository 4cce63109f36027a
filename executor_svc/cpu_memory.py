"""How the executor holds memory on a CPU: a steadier allocator, bounded oneDNN
caches, and KV pools mapped before the first step.

glibc serves every allocation above its mmap threshold with a fresh ``mmap``, and returns it on
free; each step then page-faults its activations in again. On this project's VM that took a
64 x 400-token K/V gather from 3.7 to 24 ms and a 2048-token GEMM from 143 to 85 GFLOP/s
(BENCHMARKS.md, "What changed in the executor"). ``tune_allocator`` keeps freed memory in the
heap instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from torch import Tensor

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
_TRIM_THRESHOLD = 1 << 30
PRIMITIVE_CACHE_CAPACITY = 64
_MADV_HUGEPAGE = 14  # from the kernel's mman-common.h
_HUGE_PAGE = 2 << 20


def _libc_function(name: str):
    """The C library's function ``name``, or None where there is no such function (no
    glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def tune_allocator() -> bool:
    """Serve allocations up to 32 MiB from the heap and keep up to 1 GiB of freed memory
    there, so that steps reuse memory instead of mapping and faulting it in again. False
    where the C library is not glibc (nothing changes then)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def bound_primitive_cache(capacity: int = PRIMITIVE_CACHE_CAPACITY) -> None:
    """Keep at most ``capacity`` oneDNN primitives, and as many of torch's own cached oneDNN
    operations (unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` or ``LRU_CACHE_CAPACITY`` say
    otherwise); call before the first GEMM. Both keep one entry per GEMM shape, so one per
    batch size each step brings, and both default to 1024. torch's entry for a prepacked
    bfloat16 GEMM keeps buffers that grow with the batch: ~5 MB for a 1,000-row 576 x 3072
    one, so with the default an executor's heap grew run after run (BENCHMARKS.md, "Memory
    under load"). Steps whose batch size was evicted build it again, about a millisecond per
    weight shape."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(capacity))


def release_free_memory() -> None:
    """Hand the heap's free memory back to the system (glibc ``malloc_trim``): after loading,
    the dense copies of packed weights would otherwise stay resident under the raised trim
    threshold. A no-op elsewhere."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def map_kv_pool(tensor: Tensor, populate: bool) -> bool:
    """Ask the kernel to back ``tensor`` (a large CPU tensor: a layer's KV cache) with 2 MiB
    pages where transparent huge pages are allowed on request (``madvise`` mode), and with
    ``populate`` write it once (zeros), so that its pages are mapped before the first step
    instead of on a step's first write to each. On this project's VM a fault on a fresh
    4 KiB page cost ~6 µs, so a decode step's K/V writes into fresh blocks took 4 ms of its
    83 (BENCHMARKS.md, "After our own CPU kernels"). Returns whether the advice was
    taken; the tensor is usable either way."""
    start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    advised = False
    madvise = _libc_function("madvise")
    if end > start and madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        advised = madvise(start, end - start, _MADV_HUGEPAGE) == 0
    if populate:
        tensor.zero_()
    return advised
