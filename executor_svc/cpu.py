"""What the executor does differently on a CPU: a steadier allocator and prepacked weights.

Both were measured (BENCHMARKS.md, "What changed in the executor"):

- glibc serves every allocation above its mmap threshold with a fresh ``mmap``, and returns
  it on free; each step then page-faults its activations in again. On this project's VM that
  took a 64 x 400-token K/V gather from 3.7 to 24 ms and a 2048-token GEMM from 143 to 85
  GFLOP/s. ``tune_allocator`` keeps freed memory in the heap instead.
- ``F.linear`` packs the weight for the GEMM on every call. oneDNN can pack it once:
  ``PackedLinear`` holds the packed copy, which ran the decoder's GEMMs of a 32-token decode
  step at 95 instead of 54 GFLOP/s.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
from torch import Tensor, nn

from pagedserve.common.log import get_logger
from pagedserve.executor_svc import cpu_kernels

log = get_logger("executor")

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
    """Keep at most ``capacity`` oneDNN primitives (unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``
    says otherwise); call before the first GEMM. oneDNN caches one primitive per GEMM shape,
    so one per batch size each step brings; its default of 1024 let an executor's resident
    memory grow run after run (BENCHMARKS.md, "Memory under load"). Steps whose batch size
    was evicted build it again, about a millisecond per weight shape."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


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


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` with the weight packed once for a faster GEMM: our own
    kernel's panels (``cpu_kernels.PackedWeight``) for a float32 weight where the kernels build,
    else (or with ``onednn``) oneDNN's packed layout.

    Holds only the packed weight: the dense one is not kept (a tied embedding keeps its own).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, batch_hint: int,
                 onednn: bool = False):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.onednn = onednn or not cpu_kernels.fuses(weight)
        if self.onednn:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
            self.bias = None if bias is None else bias.detach().contiguous()
        else:
            self.kernel = cpu_kernels.PackedWeight(weight.detach(), bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.onednn:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        else:
            out = self.kernel(flat.contiguous())
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked GEMM serves ``dtype`` on this CPU: float32 everywhere
    oneDNN is built in; bfloat16 only with native bf16 instructions (without them oneDNN has
    no fast kernel for it, and ``F.linear`` stays)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(model: nn.Module, batch_hint: int = 32) -> int:
    """Swap every ``nn.Linear`` of ``model`` for a ``PackedLinear`` where oneDNN serves its
    dtype; returns how many were swapped. Each is checked against ``F.linear`` once: a
    mismatch leaves the model as it was and logs why."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and can_pack(module.weight.dtype)
               and module.weight.device.type == "cpu"]
    packed = {}
    for name, module in targets:
        try:
            layer = PackedLinear(module.weight, module.bias, batch_hint)
            _check_packed(layer, module)
        except (RuntimeError, AttributeError) as exc:
            log.warning("prepacked linear unavailable; using F.linear", error=str(exc))
            return 0
        packed[name] = layer
    for name, layer in packed.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return len(packed)


def _check_packed(layer: PackedLinear, dense: nn.Linear) -> None:
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(
        dense.weight.dtype)
    want, got = dense(x), layer(x)
    tolerance = 1e-4 if want.dtype == torch.float32 else 5e-2
    if not torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance):
        raise RuntimeError(f"packed GEMM differs from F.linear by "
                           f"{(got - want).abs().max().item():.3g}")

