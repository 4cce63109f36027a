"""A decoder layer's elementwise work in Triton, one launch each where torch's operators take
several: residual add + RMSNorm, SiLU(gate) * up, and RoPE of the queries and keys with the
write of keys and values to their cache slots; and greedy sampling, a row's argmax and its
logprob in one pass.

A small model's decode step on a GPU is a thousand tiny kernels, each a launch and a pass over
memory (torch's RMSNorm is nine, RoPE five per tensor); fused, a layer is about ten. Each
kernel computes in float32 and rounds where torch's operators round, so that outputs match
the torch path (``executor_svc.layer_ops.LayerOps``, ``attention.rope_then_write``): exactly
for SiLU-mul and RoPE, to float32's reduction order for the norm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cache_ops import check_cache_pair


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, hidden, stride_x,
                         stride_residual, stride_out, eps, HAS_X: tl.constexpr,
                         BLOCK: tl.constexpr):
    # One program per row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    total = tl.load(residual_ptr + row * stride_residual + cols, mask=mask,
                    other=0.0).to(tl.float32)
    if HAS_X:  # the sum, rounded to the activations' dtype as torch's add rounds it, is kept
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rounded = (total + x).to(dtype)
        tl.store(residual_ptr + row * stride_residual + cols, rounded, mask=mask)
        total = rounded.to(tl.float32)
    variance = tl.sum(total * total, axis=0) / hidden
    normed = (total * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(dtype), mask=mask)


def add_rms_norm(x: Tensor | None, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``residual + x`` (``residual`` alone when ``x`` is None) times ``weight``, as
    a new tensor; the sum is written into ``residual``. ``[T, hidden]`` rows with contiguous
    last dimensions, one dtype."""
    kernel, grid, args = add_rms_norm_launch(x, residual, weight, eps)
    kernel[grid](**args)
    return args["out_ptr"]


def add_rms_norm_launch(x: Tensor | None, residual: Tensor, weight: Tensor, eps: float) -> tuple:
    """The ``(kernel, grid, arguments)`` launch that ``add_rms_norm`` makes, its output
    allocated, after validating its inputs."""
    _check_rows("residual", residual, residual.dtype, residual.shape[-1])
    if x is not None:
        _check_rows("x", x, residual.dtype, residual.shape[-1], len(residual))
    if weight.shape != (residual.shape[-1],) or weight.dtype != residual.dtype:
        raise ValueError(f"weight must be {residual.dtype} [{residual.shape[-1]}], got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    args = {"x_ptr": residual if x is None else x, "residual_ptr": residual,
            "weight_ptr": weight, "out_ptr": out, "hidden": residual.shape[-1],
            "stride_x": (residual if x is None else x).stride(0),
            "stride_residual": residual.stride(0), "stride_out": out.stride(0), "eps": eps,
            "HAS_X": x is not None, "BLOCK": triton.next_power_of_2(residual.shape[-1])}
    return _add_rms_norm_kernel, (len(residual),), args


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, stride_in, stride_out, BLOCK: tl.constexpr):
    # One program per row and BLOCK columns.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask,
                 other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dtype), mask=mask)


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``gate_up`` (``[T, 2 * inter]``, gate columns first), as a new
    ``[T, inter]`` tensor."""
    kernel, grid, args = silu_mul_launch(gate_up)
    kernel[grid](**args)
    return args["out_ptr"]


def silu_mul_launch(gate_up: Tensor) -> tuple:
    """The ``(kernel, grid, arguments)`` launch that ``silu_mul`` makes, its output allocated."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * inter], got {tuple(gate_up.shape)}")
    _check_rows("gate_up", gate_up, gate_up.dtype, gate_up.shape[1])
    inter = gate_up.shape[1] // 2
    out = gate_up.new_empty(len(gate_up), inter)
    block = min(1024, triton.next_power_of_2(inter))
    args = {"gate_up_ptr": gate_up, "out_ptr": out, "inter": inter,
            "stride_in": gate_up.stride(0), "stride_out": out.stride(0), "BLOCK": block}
    return _silu_mul_kernel, (len(gate_up), triton.cdiv(inter, block)), args


@triton.jit
def _rotate(ptr, cos, sin, HALF: tl.constexpr, mask, dtype: tl.constexpr):
    """Rotate-half RoPE of the heads at ``ptr`` (``[heads, HALF]`` offsets of the first
    halves), rounded as torch's ``x * cos + rotated * sin`` in ``dtype`` rounds."""
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _rope_write_kv_kernel(qkv_ptr, query_ptr, cos_ptr, sin_ptr, positions_ptr, key_cache_ptr,
                          value_cache_ptr, slot_mapping_ptr, num_heads, num_kv_heads,
                          stride_qkv, stride_cache_block, stride_cache_token, stride_cache_head,
                          HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr,
                          KV_HEADS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # One program per token: its query heads into the query tensor, its key heads rotated in
    # place and, with its value heads, into the token's cache slot (unless the slot is -1).
    token = tl.program_id(0).to(tl.int64)
    dtype = query_ptr.dtype.element_ty
    head_dim = 2 * HALF
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + position * HALF + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(sin_ptr + position * HALF + dims, mask=dims < HALF, other=0.0)
    cos = cos.to(dtype).to(tl.float32)[None, :]  # torch rotates with dtype angles
    sin = sin.to(dtype).to(tl.float32)[None, :]
    row = qkv_ptr + token * stride_qkv
    heads = tl.arange(0, HEADS_PAD)[:, None]
    mask = (heads < num_heads) & (dims[None, :] < HALF)
    out1, out2 = _rotate(row + heads * head_dim + dims[None, :], cos, sin, HALF, mask, dtype)
    query = query_ptr + token * num_heads * head_dim + heads * head_dim + dims[None, :]
    tl.store(query, out1, mask=mask)
    tl.store(query + HALF, out2, mask=mask)
    kv_heads = tl.arange(0, KV_HEADS_PAD)[:, None]
    kv_mask = (kv_heads < num_kv_heads) & (dims[None, :] < HALF)
    key = row + (num_heads + kv_heads) * head_dim + dims[None, :]
    key1, key2 = _rotate(key, cos, sin, HALF, kv_mask, dtype)
    tl.store(key, key1, mask=kv_mask)
    tl.store(key + HALF, key2, mask=kv_mask)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        value = key + num_kv_heads * head_dim
        cache = ((slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE)
                 * stride_cache_token + kv_heads * stride_cache_head + dims[None, :])
        tl.store(key_cache_ptr + cache, key1, mask=kv_mask)
        tl.store(key_cache_ptr + cache + HALF, key2, mask=kv_mask)
        tl.store(value_cache_ptr + cache, tl.load(value, mask=kv_mask), mask=kv_mask)
        tl.store(value_cache_ptr + cache + HALF, tl.load(value + HALF, mask=kv_mask),
                 mask=kv_mask)


def rope_write_kv(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, positions: Tensor,
                  key_cache: Tensor, value_cache: Tensor,
                  slot_mapping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate the queries and keys of ``qkv`` (``[T, (num_heads + 2 * num_kv_heads) *
    head_dim]``, contiguous rows) by their tokens' ``positions`` (rotate-half, angles from the
    float32 tables ``cos`` and ``sin``, ``[max_positions, head_dim / 2]``), and write each
    token's keys and values to cache slot ``slot_mapping[t]`` (-1: none). Returns q (a new
    ``[T, num_heads, head_dim]`` tensor), k (rotated in place in ``qkv``) and v, as
    ``[T, heads, head_dim]``."""
    kernel, grid, args = rope_write_kv_launch(qkv, num_heads, cos, sin, positions, key_cache,
                                              value_cache, slot_mapping)
    kernel[grid](**args)
    num_kv_heads, head_dim = key_cache.shape[2:]
    _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], -1)
    return (args["query_ptr"], k.unflatten(-1, (num_kv_heads, head_dim)),
            v.unflatten(-1, (num_kv_heads, head_dim)))


def rope_write_kv_launch(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor,
                         positions: Tensor, key_cache: Tensor, value_cache: Tensor,
                         slot_mapping: Tensor) -> tuple:
    """The ``(kernel, grid, arguments)`` launch that ``rope_write_kv`` makes, its query tensor
    allocated, after validating its inputs."""
    check_cache_pair(key_cache, value_cache)
    num_kv_heads, head_dim = key_cache.shape[2:]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    _check_rows("qkv", qkv, key_cache.dtype, width)
    half = head_dim // 2
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != half or not table.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [max_positions, {half}] table, got "
                             f"{tuple(table.shape)}")
    for name, ids in (("positions", positions), ("slot_mapping", slot_mapping)):
        if ids.shape != (len(qkv),) or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64 [{len(qkv)}], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
    query = qkv.new_empty(len(qkv), num_heads, head_dim)
    args = {"qkv_ptr": qkv, "query_ptr": query, "cos_ptr": cos, "sin_ptr": sin,
            "positions_ptr": positions, "key_cache_ptr": key_cache,
            "value_cache_ptr": value_cache, "slot_mapping_ptr": slot_mapping,
            "num_heads": num_heads, "num_kv_heads": num_kv_heads, "stride_qkv": qkv.stride(0),
            "stride_cache_block": key_cache.stride(0), "stride_cache_token": key_cache.stride(1),
            "stride_cache_head": key_cache.stride(2), "HALF": half,
            "HALF_PAD": triton.next_power_of_2(half),
            "HEADS_PAD": triton.next_power_of_2(num_heads),
            "KV_HEADS_PAD": triton.next_power_of_2(num_kv_heads),
            "BLOCK_SIZE": key_cache.shape[1]}
    return _rope_write_kv_kernel, (len(qkv),), args


@triton.jit
def _greedy_kernel(logits_ptr, token_ptr, logprob_ptr, vocab, stride, BLOCK: tl.constexpr):
    # One program per row, one pass: the running max (the first index on ties) and the sum of
    # exp(x - max) rescaled as the max grows; the argmax's logprob is -log(sum).
    row = tl.program_id(0).to(tl.int64)
    best = float("-inf")
    index = 0
    total = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride + cols, mask=cols < vocab,
                    other=float("-inf")).to(tl.float32)
        chunk_max = tl.max(x, axis=0)
        chunk_index = start + tl.argmax(x, axis=0)
        new_best = tl.maximum(best, chunk_max)
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(x - new_best), axis=0)
        index = tl.where(chunk_max > best, chunk_index, index)
        best = new_best
    tl.store(token_ptr + row, index.to(tl.int64))
    tl.store(logprob_ptr + row, -tl.log(total))


def greedy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's argmax (``[S]`` int64, the first on ties) and its log-probability under the
    row's softmax (``[S]`` float32) of ``logits`` (``[S, vocab]``, any float dtype, widened),
    in one pass over each row."""
    kernel, grid, args = greedy_launch(logits)
    kernel[grid](**args)
    return args["token_ptr"], args["logprob_ptr"]


def greedy_launch(logits: Tensor) -> tuple:
    """The ``(kernel, grid, arguments)`` launch that ``greedy`` makes, its outputs allocated."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [S, vocab] with a contiguous last dimension, got "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    rows, vocab = logits.shape
    args = {"logits_ptr": logits, "token_ptr": torch.empty(rows, dtype=torch.int64,
                                                           device=logits.device),
            "logprob_ptr": torch.empty(rows, dtype=torch.float32, device=logits.device),
            "vocab": vocab, "stride": logits.stride(0),
            "BLOCK": min(4096, triton.next_power_of_2(vocab))}
    return _greedy_kernel, (rows,), args


def _check_rows(name: str, tensor: Tensor, dtype: torch.dtype, width: int,
                rows: int | None = None) -> None:
    if (tensor.dim() != 2 or tensor.shape[1] != width or tensor.stride(1) != 1
            or tensor.dtype != dtype or (rows is not None and len(tensor) != rows)):
        expected = f"[{'T' if rows is None else rows}, {width}]"
        raise ValueError(f"{name} must be {dtype} {expected} with a contiguous last dimension, "
                         f"got {tensor.dtype} {tuple(tensor.shape)} strides {tensor.stride()}")
