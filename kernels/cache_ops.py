"""The KV cache's writes in Triton: ``reshape_and_cache`` scatters the new tokens' keys and values
into their cache slots; ``copy_blocks`` moves whole blocks of every layer in one launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _reshape_and_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr,
                              slot_mapping_ptr, num_kv_heads, head_dim,
                              stride_key_token, stride_key_head,
                              stride_value_token, stride_value_head,
                              stride_cache_block, stride_cache_token, stride_cache_head,
                              BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr,
                              HEAD_DIM_PAD: tl.constexpr):
    # One program per token, all of its kv heads at once.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)
    cache_offsets = ((slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE)
                     * stride_cache_token + heads * stride_cache_head + dims)
    key = tl.load(key_ptr + token * stride_key_token + heads * stride_key_head + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_value_token + heads * stride_value_head + dims,
                    mask=mask)
    tl.store(key_cache_ptr + cache_offsets, key, mask=mask)
    tl.store(value_cache_ptr + cache_offsets, value, mask=mask)


def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                      slot_mapping: Tensor) -> None:
    """Write token ``t``'s key and value into slot ``slot_mapping[t]`` of the caches, in place.

    ``key`` and ``value`` are ``[num_tokens, num_kv_heads, head_dim]`` (token and head strides
    are free, the last dimension must be contiguous), the caches ``[num_blocks, block_size,
    num_kv_heads, head_dim]`` of the same dtype, and slot ``block_id * block_size + offset``
    names a token position in the cache. A slot of -1 is skipped (a padding token).
    """
    kernel, grid, args = reshape_and_cache_launch(key, value, key_cache, value_cache, slot_mapping)
    kernel[grid](**args)


def reshape_and_cache_launch(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                             slot_mapping: Tensor) -> tuple:
    """The ``(kernel, grid, arguments)`` launch that ``reshape_and_cache`` makes, after validating
    its inputs."""
    check_cache_pair(key_cache, value_cache)
    _check_new_tokens(key, value, key_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    args = {
        "key_ptr": key, "value_ptr": value, "key_cache_ptr": key_cache,
        "value_cache_ptr": value_cache, "slot_mapping_ptr": slot_mapping,
        "num_kv_heads": num_kv_heads, "head_dim": head_dim,
        "stride_key_token": key.stride(0), "stride_key_head": key.stride(1),
        "stride_value_token": value.stride(0), "stride_value_head": value.stride(1),
        "stride_cache_block": key_cache.stride(0), "stride_cache_token": key_cache.stride(1),
        "stride_cache_head": key_cache.stride(2), "BLOCK_SIZE": key_cache.shape[1],
        "HEADS_PAD": triton.next_power_of_2(num_kv_heads),
        "HEAD_DIM_PAD": triton.next_power_of_2(head_dim)}
    return _reshape_and_cache_kernel, (num_tokens,), args


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


def _check_new_tokens(key: Tensor, value: Tensor, key_cache: Tensor, slot_mapping: Tensor) -> None:
    expected = (key.shape[0], *key_cache.shape[2:])
    for name, tensor in (("key", key), ("value", value)):
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must be [num_tokens, num_kv_heads, head_dim] = {expected} "
                             f"to match key_cache {tuple(key_cache.shape)}, got "
                             f"{tuple(tensor.shape)}")
        if tensor.dtype != key_cache.dtype or tensor.device != key_cache.device:
            raise ValueError(f"{name} is {tensor.dtype} on {tensor.device}, the cache "
                             f"{key_cache.dtype} on {key_cache.device}: they must match")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension, got strides "
                             f"{tensor.stride()}")
    if (slot_mapping.shape != (key.shape[0],)
            or slot_mapping.dtype not in (torch.int32, torch.int64)
            or slot_mapping.device != key.device):
        raise ValueError(f"slot_mapping must be int32 or int64 [{key.shape[0]}] on {key.device}, "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)} on "
                         f"{slot_mapping.device}")


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
