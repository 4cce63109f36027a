"""The executor's compiled CPU kernels (``csrc/cpu_kernels.c``), float32, loaded with ctypes.

- **Paged attention**, decode rows and prompts (or chunks of them) in one call: each new
  token attends over its sequence's context straight from the block table. Decode reads every
  sequence's whole context each step; gathering those blocks into a contiguous copy first (the
  torch path) moves the context through memory three times, the kernel reads it once, in
  place. Prompts of 128 and 500 tokens ran 1.4-1.5x faster than in torch's fused attention
  (``benchmarks/cpu_attention.py``).
- **A decoder layer's elementwise work, fused**: residual add + RMSNorm, RoPE of the queries
  and keys + the write of keys and values to their cache slots, and SiLU(gate) * up. Unfused,
  these are some twenty torch operators per layer, each a pass over memory and a dispatch.
- **Greedy sampling**: each row's argmax and its log-probability in two passes over the row,
  where ``argmax``, ``log_softmax`` and ``gather`` make three and write the whole softmax.

It is plain C with no torch headers: it builds in about a second with the system's C compiler,
once per machine and source, into pagedserve's cache (``-march=native``, so the build is keyed
by the CPU's flags too). Without a compiler, or for other dtypes than float32, the model takes
the torch path. ``PAGEDSERVE_CPU_KERNELS=0`` forces that path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from pagedserve.common.config import cache_dir
from pagedserve.common.log import get_logger

log = get_logger("executor")
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
BUILD = "8-float (256-bit) vectors, -march=native"  # what the source is written for
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built kernel library, building it on first use; None (and one warning) when it
    cannot be built here. ``PAGEDSERVE_CPU_KERNELS=0`` turns it off."""
    if os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: the CPU kernels take the slower torch path")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_flags()])).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if not library.exists():
        try:
            _build(compiler, library)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            log.warning("CPU kernels did not build: taking the torch path",
                        error=str(detail).strip()[-500:])
            return None
    lib = ctypes.CDLL(str(library))
    lib.paged_attention_f32.argtypes = ([_PTR, _I64, _PTR, _PTR, _I64] + [_PTR] * 4
                                        + [_I64] * 6 + [ctypes.c_float, _I64])
    lib.add_rms_norm_f32.argtypes = [_PTR] * 4 + [_I64] * 2 + [ctypes.c_float, _I64]
    lib.rope_write_kv_f32.argtypes = ([_PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64,
                                       _PTR] + [_I64] * 6)
    lib.silu_mul_f32.argtypes = [_PTR, _PTR] + [_I64] * 3
    lib.greedy_f32.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64]
    lib.linear_f32.argtypes = [_PTR, _PTR, _I64, _PTR, _PTR] + [_I64] * 4
    for function in (lib.paged_attention_f32, lib.add_rms_norm_f32, lib.rope_write_kv_f32,
                     lib.silu_mul_f32, lib.greedy_f32, lib.linear_f32):
        function.restype = ctypes.c_int
    return lib


def _build(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent executors never load a partial file.
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(partial, library)


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return os.uname().machine.encode()


KV_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write in the cache


def serves(dtype: torch.dtype, kv_dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the attention kernel serves queries of ``dtype`` over a ``kv_dtype`` cache on
    ``device``: a float32 or bfloat16 cache, and ``fuses(dtype, device)``."""
    return kv_dtype in KV_DTYPES and fuses(dtype, device)


def _kv_bf16(k_cache: Tensor, v_cache: Tensor) -> int:
    """1 for bfloat16 caches, 0 for float32 ones; a ValueError for others, or for K and V of
    different dtypes or not contiguous."""
    if k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"the CPU kernels take float32 or bfloat16 KV caches, one dtype for "
                         f"K and V; got {k_cache.dtype} and {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    return int(k_cache.dtype == torch.bfloat16)


class AttentionBatch(NamedTuple):
    """A step's sequences as ``paged_attention`` reads them, converted and checked once per
    step (``attention_batch``) for every layer's call."""

    tables: Tensor  # [S, max_blocks] int64
    starts: Tensor  # [S + 1] int64: where each sequence's query rows start
    lens: Tensor  # [S] int64: context lengths, the step's own tokens included
    rows: int  # query rows the batch describes


def attention_batch(block_tables: Tensor, query_start_loc: Tensor,
                    seq_lens: Tensor) -> AttentionBatch:
    """The batch of ``paged_attention``: sequence ``s``'s query rows start at
    ``query_start_loc[s]`` and end at ``query_start_loc[s + 1]``; it attends over the first
    ``seq_lens[s]`` tokens that ``block_tables[s]`` names."""
    tables = block_tables.to(torch.int64).contiguous()
    starts = query_start_loc.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    if starts.shape[0] != lens.shape[0] + 1 or tables.shape[0] != lens.shape[0]:
        raise ValueError(f"{tables.shape[0]} block tables, {starts.shape[0]} query starts and "
                         f"{lens.shape[0]} lengths do not describe one batch")
    return AttentionBatch(tables, starts, lens, int(starts[-1]))


def paged_attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch,
                    scale: float) -> Tensor:
    """Causal attention of a step's new tokens (``query``: ``[T, H, hd]``; its rows may lie
    apart, as in a view of the q/k/v projection's output) over their contexts in the paged
    cache, as ``batch`` describes them; the step's own K/V must be in the cache already.
    ``[T, H, hd]``, contiguous."""
    num_heads, head_dim = query.shape[1:]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.contiguous()
    kv_bf16 = _kv_bf16(k_cache, v_cache)
    if batch.rows != query.shape[0]:
        raise ValueError(f"query starts end at {batch.rows}, not at the {query.shape[0]} "
                         "query rows")
    out = query.new_empty(query.shape)
    status = load().paged_attention_f32(
        query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), kv_bf16,
        batch.tables.data_ptr(), batch.starts.data_ptr(), batch.lens.data_ptr(),
        out.data_ptr(), batch.lens.shape[0], num_heads, num_kv_heads, head_dim, block_size,
        batch.tables.shape[1], scale, torch.get_num_threads())
    if status == -2:
        raise MemoryError("paged_attention: no memory for the work list")
    if status:
        raise ValueError(f"the CPU attention kernel does not serve {num_heads} heads over "
                         f"{num_kv_heads} kv heads with blocks of {block_size}, or a query "
                         "longer than its context or table")
    return out


def fuses(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the layer kernels serve activations of ``dtype`` on ``device``: float32 on the
    CPU, and built here."""
    return dtype == torch.float32 and torch.device(device).type == "cpu" and load() is not None


def add_rms_norm(x: Tensor | None, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``residual += x`` in place (unless ``x`` is None), then RMSNorm of ``residual`` times
    ``weight``, as a new tensor. All ``[T, hidden]`` (``weight``: ``[hidden]``), contiguous."""
    tokens, hidden = residual.shape
    _check_contiguous(residual, weight, *([] if x is None else [x]))
    out = torch.empty_like(residual)
    _call("add_rms_norm_f32", residual.data_ptr(), None if x is None else x.data_ptr(),
          weight.data_ptr(), out.data_ptr(), tokens, hidden, eps, torch.get_num_threads())
    return out


def rope_write_kv(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                  positions: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slot_mapping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate the queries and keys of ``qkv`` (``[T, (heads + 2 * kv_heads) * head_dim]``, the
    q/k/v projection's output) in place by their ``positions`` (rotate-half layout; ``cos``,
    ``sin``: ``[max_positions, head_dim / 2]``), and write keys and values to their cache
    slots (-1: not stored; a bfloat16 cache stores them rounded as ``Tensor.bfloat16``).
    Returns q, k, v as ``[T, heads, head_dim]`` views of ``qkv``."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    kv_bf16 = _kv_bf16(k_cache, v_cache)
    _check_contiguous(cos, sin, positions, slot_mapping)
    if qkv.stride(1) != 1 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"q/k/v rows must be {num_heads} + 2 x {num_kv_heads} heads of "
                         f"{head_dim}, contiguous; got {tuple(qkv.shape)}")
    if positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64:
        raise ValueError("positions and slots must be int64")
    status = load().rope_write_kv_f32(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), cos.shape[0],
        positions.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kv_bf16,
        slot_mapping.data_ptr(),
        k_cache.shape[0] * k_cache.shape[1], tokens, num_heads, num_kv_heads, head_dim,
        torch.get_num_threads())
    if status == 1:
        raise IndexError(f"a position is past the rotary tables' {cos.shape[0]}")
    if status == 2:
        raise IndexError(f"a slot is past the cache's {k_cache.shape[0] * k_cache.shape[1]}")
    if status:
        raise ValueError(f"rope_write_kv does not serve head_dim {head_dim}")
    heads = qkv.view(tokens, -1, head_dim)
    return (heads[:, :num_heads], heads[:, num_heads:num_heads + num_kv_heads],
            heads[:, num_heads + num_kv_heads:])


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``gate_up`` (``[T, 2 * inter]``, gate columns first)."""
    tokens, width = gate_up.shape
    _check_contiguous(gate_up)
    out = gate_up.new_empty(tokens, width // 2)
    _call("silu_mul_f32", gate_up.data_ptr(), out.data_ptr(), tokens, width // 2,
          torch.get_num_threads())
    return out


def greedy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's argmax (``[S]`` int64: the first on ties, the first NaN if any, as
    ``torch.argmax``) and its log-probability under the row's softmax (``[S]`` float32)."""
    rows, vocab = logits.shape
    _check_contiguous(logits)
    token_ids = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    _call("greedy_f32", logits.data_ptr(), rows, vocab, token_ids.data_ptr(),
          logprobs.data_ptr(), torch.get_num_threads())
    return token_ids, logprobs


GEMM_NR = 16  # output columns per weight panel: csrc's GEMM_NR


def pack_weight(weight: Tensor, allow_bf16: bool = True) -> Tensor:
    """A linear layer's float32 ``weight`` (``[out, in]``) packed for ``linear``: panels of
    16 output columns, ``[panels, in, 16]``, the last one zero-padded. bfloat16 where every
    weight is a bfloat16 value (as in a bf16 checkpoint served in float32): then the kernel
    widens them back exactly, and a decode step streams half the bytes. Else float32. A
    bfloat16 panel's rows hold column i at 2i and column 8 + i at 2i + 1 (csrc's load_w)."""
    out_features, in_features = weight.shape
    exact = allow_bf16 and torch.equal(weight.to(torch.bfloat16).float(), weight)
    panels = -(-out_features // GEMM_NR)
    padded = weight.new_zeros(panels * GEMM_NR, in_features,
                              dtype=torch.bfloat16 if exact else torch.float32)
    padded[:out_features] = weight
    if not exact:
        return padded.view(panels, GEMM_NR, in_features).transpose(1, 2).contiguous()
    halves = padded.view(panels, 2, GEMM_NR // 2, in_features)  # [panel, half, i, k]
    return halves.permute(0, 3, 2, 1).reshape(panels, in_features, GEMM_NR)


class PackedWeight:
    """A linear layer's float32 weight (``[out, in]``) packed by ``pack_weight``, its bias, and
    the constant arguments of the GEMM's call, bound once: calling it on ``x`` (``[T, in]``,
    float32, contiguous) is ``F.linear(x, weight, bias)``, ``[T, out]``, float32 sums."""

    def __init__(self, weight: Tensor, bias: Tensor | None, allow_bf16: bool = True):
        self.out_features, self.in_features = weight.shape
        self.panels = pack_weight(weight, allow_bf16)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._weight = (self.panels.data_ptr(), int(self.panels.dtype == torch.bfloat16),
                        None if self.bias is None else self.bias.data_ptr())

    def __call__(self, x: Tensor) -> Tensor:
        tokens, in_features = x.shape
        if in_features != self.in_features:
            raise ValueError(f"a [{tokens}, {in_features}] input does not fit weight panels "
                             f"{tuple(self.panels.shape)} of {self.out_features} outputs")
        if not x.is_contiguous():
            raise ValueError("the CPU kernels take contiguous tensors")
        out = x.new_empty(tokens, self.out_features)
        status = load().linear_f32(x.data_ptr(), *self._weight, out.data_ptr(), tokens,
                                   self.out_features, in_features, torch.get_num_threads())
        if status == -2:
            raise MemoryError(f"linear: no memory for a [{tokens}, {in_features}] input's "
                              "panels")
        if status:
            raise ValueError("linear_f32 rejected its arguments")
        return out


def _call(name: str, *args) -> None:
    if getattr(load(), name)(*args):
        raise ValueError(f"{name} rejected its arguments")


def _check_contiguous(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the CPU kernels take contiguous tensors")
