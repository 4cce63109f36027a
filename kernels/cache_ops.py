"""The KV cache's block operations in Triton: ``copy_blocks`` moves whole blocks of every layer in
one launch (copy-on-write, swapping); ``check_cache_pair`` holds the kernels to one cache
layout. The new tokens' keys and values are written by ``layer_ops.rope_write_kv``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def check_cache_pair(key_cache: Tensor, value_cache: Tensor) -> None:
    """Raise ValueError unless the caches are one ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` layout: same shape, dtype, device and strides, last dimension contiguous (the
    kernels address both with the key cache's strides)."""
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(key_cache.shape)}")
    for name in ("shape", "dtype", "device"):
        if getattr(key_cache, name) != getattr(value_cache, name):
            raise ValueError(f"value_cache {name} {getattr(value_cache, name)} differs from "
                             f"key_cache {name} {getattr(key_cache, name)}")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError(f"the caches need equal strides with a contiguous last dimension, got "
                         f"key_cache {key_cache.stride()} and value_cache {value_cache.stride()}")


@triton.jit
def _copy_blocks_kernel(src_ptr, dst_ptr, pairs_ptr, src_stride_block, src_stride_plane,
                        dst_stride_block, dst_stride_plane, block_numel,
                        CHUNK: tl.constexpr):
    # One program per (pair, plane): a plane is one layer's K or V, a block of it is contiguous.
    pair = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    src_block = tl.load(pairs_ptr + 2 * pair).to(tl.int64)
    dst_block = tl.load(pairs_ptr + 2 * pair + 1).to(tl.int64)
    src = src_ptr + src_block * src_stride_block + plane * src_stride_plane
    dst = dst_ptr + dst_block * dst_stride_block + plane * dst_stride_plane
    for start in range(0, block_numel, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        mask = offsets < block_numel
        tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)


_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # copied as bits


def copy_blocks(src: Tensor, dst: Tensor, pairs: Tensor) -> None:
    """For each row ``(s, d)`` of ``pairs`` (int64 ``[N, 2]`` on the kernel's device), copy block
    ``src[s]`` to ``dst[d]``: all N blocks of every plane in one launch.

    ``src`` and ``dst`` are views ``[num_blocks, num_planes, block_numel]`` of one dtype (block
    and plane strides are free, a plane's block must be contiguous); they may be one tensor
    (copy-on-write) or live in different memories the kernel can address (device blocks and
    pinned host memory, for swapping). The copies run in no order: no block may be both a
    source and a destination.
    """
    kernel, grid, args = copy_blocks_launch(src, dst, pairs)
    if len(pairs):
        kernel[grid](**args)


def copy_blocks_launch(src: Tensor, dst: Tensor, pairs: Tensor) -> tuple:
    """The ``(kernel, grid, arguments)`` launch that ``copy_blocks`` makes, after validating its
    inputs: the blocks are copied as words of their dtype's size, whatever it is."""
    _check_block_views(src, dst, pairs)
    word = _WORDS[src.element_size()]
    src, dst = src.view(word), dst.view(word)
    args = {"src_ptr": src, "dst_ptr": dst, "pairs_ptr": pairs,
            "src_stride_block": src.stride(0), "src_stride_plane": src.stride(1),
            "dst_stride_block": dst.stride(0), "dst_stride_plane": dst.stride(1),
            "block_numel": src.shape[2], "CHUNK": min(1024, triton.next_power_of_2(src.shape[2]))}
    return _copy_blocks_kernel, (len(pairs), src.shape[1]), args


def _check_block_views(src: Tensor, dst: Tensor, pairs: Tensor) -> None:
    if src.dim() != 3 or src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"src and dst must be [num_blocks, num_planes, block_numel] views of one "
                         f"dtype with equal planes, got {src.dtype} {tuple(src.shape)} and "
                         f"{dst.dtype} {tuple(dst.shape)}")
    if src.stride(2) != 1 or dst.stride(2) != 1:
        raise ValueError(f"a plane's block must be contiguous, got strides {src.stride()} and "
                         f"{dst.stride()}")
    if (pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype != torch.int64
            or not pairs.is_contiguous()):
        raise ValueError(f"pairs must be a contiguous int64 [N, 2], got {pairs.dtype} "
                         f"{tuple(pairs.shape)} with strides {pairs.stride()}")
