"""The executor's compiled CPU kernels (``csrc/*.c``), for float32 and bfloat16 activations,
loaded with ctypes.

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
- **A decoder stack in one call** (``DecoderStack``): every layer's kernels above and the
  GEMM, in the model's order, with no Python between them.

Every kernel takes float32 or bfloat16 activations (as a bf16 model has them): it computes in
float32 and rounds what it writes as torch rounds. Built per instruction set and chosen at
start by ``cpu_build``; without a build (no compiler, ``PAGEDSERVE_CPU_KERNELS=0``), or for
other dtypes, the model takes the torch path.
"""
from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from pagedserve.executor_svc import cpu_build

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def describe() -> str:
    """Which build serves, or why none does: for the log and ``pagedserve health``."""
    return cpu_build.load().status


@functools.cache
def load() -> ctypes.CDLL | None:
    """The chosen build's library with its functions' signatures declared; None where no
    build serves here."""
    library = cpu_build.load().library
    return None if library is None else declare(library.cdll)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a build of the kernels) with its functions' signatures declared."""
    lib.paged_attention.argtypes = ([_PTR, _I64, _I64, _PTR, _PTR, _I64] + [_PTR] * 4
                                    + [_I64] * 6 + [ctypes.c_float, _I64])
    lib.add_rms_norm.argtypes = [_PTR] * 4 + [_I64] * 3 + [ctypes.c_float, _I64]
    lib.rope_write_kv.argtypes = ([_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64,
                                   _PTR] + [_I64] * 7)
    lib.kv_pair_layout.argtypes = [_I64] * 4
    lib.silu_mul.argtypes = [_PTR, _PTR] + [_I64] * 4
    lib.greedy.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64]
    lib.linear.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _PTR] + [_I64] * 5
    lib.linear_silu_mul.argtypes = [_PTR, _PTR, _I64] + [_PTR] * 3 + [_I64] * 5
    lib.decoder_forward.argtypes = [ctypes.POINTER(_Decoder), ctypes.POINTER(_Step), _PTR, _PTR,
                                    _I64, ctypes.POINTER(_I64)]
    for function in (lib.paged_attention, lib.add_rms_norm, lib.rope_write_kv, lib.silu_mul,
                     lib.greedy, lib.linear, lib.linear_silu_mul, lib.decoder_forward):
        function.restype = ctypes.c_int
    for function in (lib.gemm_columns, lib.gemm_bf16_pairs, lib.gemm_bf16_products,
                     lib.gemm_amx):
        function.restype = _I64
    lib.attention_bf16_products.restype = lib.kv_pair_layout.restype = _I64
    return lib


DTYPES = (torch.float32, torch.bfloat16)  # the activations and caches the kernels take
_WEIGHT_AMX = 2  # linear's weight_bf16 for panels packed for AMX tiles (kernels.h)


def serves(dtype: torch.dtype, kv_dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the attention kernel serves queries of ``dtype`` over a ``kv_dtype`` cache on
    ``device``: a float32 or bfloat16 cache, and ``fuses(dtype, device)``."""
    return kv_dtype in DTYPES and fuses(dtype, device)


def pair_layout(dtype: torch.dtype, k_cache: Tensor) -> bool:
    """Whether the kernels keep ``k_cache`` (and its V cache: ``[blocks, block_size,
    kv_heads, head_dim]``) of a model computing in ``dtype`` in pair layout: per block and kv
    head, K as ``[head_dim / 2, block_size, 2]`` (dimensions 2d and 2d + 1 of a slot
    together) and V as ``[block_size / 2, head_dim, 2]`` (slots 2j and 2j + 1 of a dimension
    together), so that bf16 dot products read both without shuffles (``csrc/attention.c``).
    Elsewhere the cache is in row layout, as its shape reads."""
    lib = load()
    return lib is not None and bool(lib.kv_pair_layout(
        dtype == torch.bfloat16, k_cache.dtype == torch.bfloat16, k_cache.shape[-1],
        k_cache.shape[1]))


def paired(k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Row-layout caches' values in pair layout (``pair_layout``), in new tensors of the same
    shape: what ``rope_write_kv`` would have written there."""
    blocks, block_size, kv_heads, head_dim = k_cache.shape
    k = k_cache.view(blocks, block_size, kv_heads, head_dim // 2, 2).permute(0, 2, 3, 1, 4)
    v = v_cache.view(blocks, block_size // 2, 2, kv_heads, head_dim).permute(0, 3, 1, 4, 2)
    return k.reshape(k_cache.shape), v.reshape(v_cache.shape)


def unpaired(k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Pair-layout caches' values in row layout, in new tensors: ``paired``'s inverse."""
    blocks, block_size, kv_heads, head_dim = k_cache.shape
    k = k_cache.view(blocks, kv_heads, head_dim // 2, block_size, 2).permute(0, 3, 1, 2, 4)
    v = v_cache.view(blocks, kv_heads, block_size // 2, head_dim, 2).permute(0, 2, 4, 1, 3)
    return k.reshape(k_cache.shape), v.reshape(v_cache.shape)


def _bf16(*tensors: Tensor) -> int:
    """1 for bfloat16 activations, 0 for float32 ones; a ValueError for others, or for
    tensors of different dtypes."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"the CPU kernels take float32 or bfloat16 activations, one dtype "
                         f"for all; got {', '.join(sorted(map(str, dtypes)))}")
    return int(tensors[0].dtype == torch.bfloat16)


def _kv_bf16(k_cache: Tensor, v_cache: Tensor) -> int:
    """1 for bfloat16 caches, 0 for float32 ones; a ValueError for others, or for K and V of
    different dtypes or not contiguous."""
    if k_cache.dtype not in DTYPES or v_cache.dtype != k_cache.dtype:
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


def _int64(tensor: Tensor) -> Tensor:
    """``tensor`` as contiguous int64, itself where it is already (a step's layout is: then
    no operator is dispatched, which on the caches a step's kernels left cold costs more)."""
    if tensor.dtype == torch.int64 and tensor.is_contiguous():
        return tensor
    return tensor.to(torch.int64).contiguous()


def attention_batch(block_tables: Tensor, query_start_loc: Tensor,
                    seq_lens: Tensor) -> AttentionBatch:
    """The batch of ``paged_attention``: sequence ``s``'s query rows start at
    ``query_start_loc[s]`` and end at ``query_start_loc[s + 1]``; it attends over the first
    ``seq_lens[s]`` tokens that ``block_tables[s]`` names."""
    tables, starts, lens = (_int64(t) for t in (block_tables, query_start_loc, seq_lens))
    if starts.shape[0] != lens.shape[0] + 1 or tables.shape[0] != lens.shape[0]:
        raise ValueError(f"{tables.shape[0]} block tables, {starts.shape[0]} query starts and "
                         f"{lens.shape[0]} lengths do not describe one batch")
    return AttentionBatch(tables, starts, lens, int(starts[-1]))


def paged_attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch,
                    scale: float) -> Tensor:
    """Causal attention of a step's new tokens (``query``: ``[T, H, hd]``, float32 or
    bfloat16; its rows may lie apart, as in a view of the q/k/v projection's output) over
    their contexts in the paged cache, as ``batch`` describes them; the step's own K/V must be
    in the cache already. ``[T, H, hd]`` in the query's dtype (float32 softmax and sums),
    contiguous. Where the build has bf16 dot products (``attention_bf16_products()``), bf16
    queries over a bf16 cache take them, the probabilities rounded to bf16 for the second
    product as torch's bf16 attention rounds them."""
    num_heads, head_dim = query.shape[1:]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.contiguous()
    kv_bf16 = _kv_bf16(k_cache, v_cache)
    if batch.rows != query.shape[0]:
        raise ValueError(f"query starts end at {batch.rows}, not at the {query.shape[0]} "
                         "query rows")
    out = query.new_empty(query.shape)
    _attention_status(load().paged_attention(
        query.data_ptr(), query.stride(0), _bf16(query), k_cache.data_ptr(),
        v_cache.data_ptr(), kv_bf16,
        batch.tables.data_ptr(), batch.starts.data_ptr(), batch.lens.data_ptr(),
        out.data_ptr(), batch.lens.shape[0], num_heads, num_kv_heads, head_dim, block_size,
        batch.tables.shape[1], scale, torch.get_num_threads()), k_cache, num_heads)
    return out


def _attention_status(status: int, k_cache: Tensor, num_heads: int) -> None:
    """Raises what a nonzero status of ``paged_attention`` means."""
    if status == -2:
        raise MemoryError("paged_attention: no memory for the work list")
    if status:
        _, block_size, num_kv_heads, _ = k_cache.shape
        raise ValueError(f"the CPU attention kernel does not serve {num_heads} heads over "
                         f"{num_kv_heads} kv heads with blocks of {block_size}, or a query "
                         "longer than its context or table")


def fuses(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the layer kernels serve activations of ``dtype`` on ``device``: float32 or
    bfloat16 on the CPU, and built here."""
    return dtype in DTYPES and torch.device(device).type == "cpu" and load() is not None


def add_rms_norm(x: Tensor | None, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``residual += x`` in place (unless ``x`` is None), then RMSNorm of ``residual`` times
    ``weight``, as a new tensor. All ``[T, hidden]`` (``weight``: ``[hidden]``), contiguous,
    of one dtype; in bfloat16 the sum, the normalised row and its product with ``weight`` are
    each rounded, as a bf16 model's torch operators round them."""
    tokens, hidden = residual.shape
    given = [residual, weight, *([] if x is None else [x])]
    _check_contiguous(*given)
    out = torch.empty_like(residual)
    _call("add_rms_norm", residual.data_ptr(), None if x is None else x.data_ptr(),
          weight.data_ptr(), out.data_ptr(), _bf16(*given), tokens, hidden, eps,
          torch.get_num_threads())
    return out


def rope_write_kv(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                  positions: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slot_mapping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate the queries and keys of ``qkv`` (``[T, (heads + 2 * kv_heads) * head_dim]``, the
    q/k/v projection's output, float32 or bfloat16: rotated in float32, rounded once) in place
    by their ``positions`` (rotate-half layout; ``cos``, ``sin``: float32
    ``[max_positions, head_dim / 2]``), and write keys and values to their cache slots (-1:
    not stored; a bfloat16 cache stores them rounded as ``Tensor.bfloat16``; in pair layout
    where ``pair_layout`` says so). Returns q, k, v as ``[T, heads, head_dim]`` views of
    ``qkv``."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    kv_bf16 = _kv_bf16(k_cache, v_cache)
    _check_contiguous(cos, sin, positions, slot_mapping)
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"the rotary tables must be float32, not {cos.dtype} and {sin.dtype}")
    if qkv.stride(1) != 1 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"q/k/v rows must be {num_heads} + 2 x {num_kv_heads} heads of "
                         f"{head_dim}, contiguous; got {tuple(qkv.shape)}")
    if positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64:
        raise ValueError("positions and slots must be int64")
    _rope_status(load().rope_write_kv(
        qkv.data_ptr(), qkv.stride(0), _bf16(qkv), cos.data_ptr(), sin.data_ptr(), cos.shape[0],
        positions.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kv_bf16,
        slot_mapping.data_ptr(),
        k_cache.shape[0] * k_cache.shape[1], k_cache.shape[1], tokens, num_heads, num_kv_heads,
        head_dim, torch.get_num_threads()), cos, k_cache)
    heads = qkv.view(tokens, -1, head_dim)
    return (heads[:, :num_heads], heads[:, num_heads:num_heads + num_kv_heads],
            heads[:, num_heads + num_kv_heads:])


def _rope_status(status: int, cos: Tensor, k_cache: Tensor) -> None:
    """Raises what a nonzero status of ``rope_write_kv`` means."""
    if status == 1:
        raise IndexError(f"a position is past the rotary tables' {cos.shape[0]}")
    if status == 2:
        raise IndexError(f"a slot is past the cache's {k_cache.shape[0] * k_cache.shape[1]}")
    if status:
        raise ValueError(f"rope_write_kv does not serve head_dim {k_cache.shape[-1]}")


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``gate_up`` (``[T, 2 * inter]``, gate columns first), in its
    dtype (float32 math, rounded once)."""
    tokens, width = gate_up.shape
    _check_contiguous(gate_up)
    out = gate_up.new_empty(tokens, width // 2)
    _call("silu_mul", gate_up.data_ptr(), out.data_ptr(), _bf16(gate_up), tokens, width // 2,
          torch.get_num_threads())
    return out


def greedy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's argmax (``[S]`` int64: the first on ties, the first NaN if any, as
    ``torch.argmax``) and its log-probability under the row's softmax (``[S]`` float32), of
    float32 or bfloat16 ``logits``."""
    rows, vocab = logits.shape
    _check_contiguous(logits)
    token_ids = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    _call("greedy", logits.data_ptr(), _bf16(logits), rows, vocab, token_ids.data_ptr(),
          logprobs.data_ptr(), torch.get_num_threads())
    return token_ids, logprobs


def pack_weight(weight: Tensor, allow_bf16: bool = True) -> Tensor:
    """A linear layer's ``weight`` (``[out, in]``, float32 or bfloat16) packed for ``linear``:
    panels of ``nr`` output columns (the build's: 16 for 8-float vectors, 32 for 16-float
    ones), ``[panels, in, nr]``, the last one zero-padded. bfloat16 where every weight is a
    bfloat16 value (a bf16 model's, or a bf16 checkpoint served in float32): then the kernel
    widens them back exactly (or multiplies them in pairs, gemm.c's W_DOTS), and a decode
    step streams half the bytes. Else float32. A bfloat16 panel's rows hold column i at 2i
    and column nr / 2 + i at 2i + 1 (gemm.c's load_w); in the builds of 16-float vectors
    (``gemm_bf16_pairs``) they hold k in pairs instead: ``[panels, in / 2, nr, 2]``, ``in``
    padded to even with zeros. A bf16 model's weight where the GEMM runs on AMX tiles
    (``amx_layout``) holds each panel's two halves of 16 columns one after the other instead,
    ``[panels, 2, in / 2, 16, 2]``: AMX's tiles, each read front to back (gemm_amx.c)."""
    out_features, in_features = weight.shape
    lib = load()
    nr = lib.gemm_columns()
    exact = allow_bf16 and (weight.dtype == torch.bfloat16 or torch.equal(
        weight.to(torch.bfloat16).float(), weight))
    panels = -(-out_features // nr)
    pairs = exact and lib.gemm_bf16_pairs()
    rows = in_features + in_features % 2 if pairs else in_features
    padded = weight.new_zeros(panels * nr, rows, dtype=torch.bfloat16 if exact else torch.float32)
    padded[:out_features, :in_features] = weight
    if not exact:
        return padded.view(panels, nr, in_features).transpose(1, 2).contiguous()
    if amx_layout(weight):  # [panel, half, column, k pair, 2] -> [panel, half, k pair, column, 2]
        halves = padded.view(panels, 2, nr // 2, rows // 2, 2).transpose(2, 3)
        return halves.reshape(panels, rows, nr)
    if pairs:  # [panel, column, k pair, 2] -> [panel, k pair, column, 2]
        return padded.view(panels, nr, rows // 2, 2).transpose(1, 2).reshape(panels, rows, nr)
    halves = padded.view(panels, 2, nr // 2, in_features)  # [panel, half, i, k]
    return halves.permute(0, 3, 2, 1).reshape(panels, in_features, nr)


def amx_layout(weight: Tensor) -> bool:
    """Whether ``pack_weight`` packs ``weight`` for AMX tiles (gemm_amx.c): a bf16 model's
    (whose inputs are bfloat16 too) where the build runs its GEMM on them and ``in`` is a
    whole number of tiles. Only bfloat16 inputs can be multiplied by it then."""
    return (weight.dtype == torch.bfloat16 and weight.shape[1] % 32 == 0
            and bool(load().gemm_amx()))


class PackedWeight:
    """A linear layer's weight (``[out, in]``) packed by ``pack_weight``, its bias, and the
    constant arguments of the GEMM's call, bound once: calling it on ``x`` (``[T, in]``,
    float32 or bfloat16, contiguous) is ``F.linear(x, weight, bias)``, ``[T, out]``, float32
    sums, in ``out_dtype`` (float32 or bfloat16, rounded once; by default x's)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, allow_bf16: bool = True):
        self.out_features, self.in_features = weight.shape
        self.panels = pack_weight(weight, allow_bf16)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.amx = allow_bf16 and amx_layout(weight)
        layout = _WEIGHT_AMX if self.amx else int(self.panels.dtype == torch.bfloat16)
        self._weight = (self.panels.data_ptr(), layout,
                        None if self.bias is None else self.bias.data_ptr())

    def __call__(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        tokens, in_features = self._fits(x)
        out = x.new_empty(tokens, self.out_features, dtype=out_dtype or x.dtype)
        status = load().linear(x.data_ptr(), _bf16(x), *self._weight, out.data_ptr(), _bf16(out),
                               tokens, self.out_features, in_features, torch.get_num_threads())
        _linear_status(status, f"a [{tokens}, {in_features}] input's")
        return out

    def silu_mul(self, x: Tensor) -> Tensor:
        """``silu(gate) * up`` of this gate/up projection's output for ``x`` (gate's
        ``out / 2`` columns first), ``[T, out / 2]`` in x's dtype: ``silu_mul(self(x))`` bit
        for bit, in one pass where ``out / 2`` is a multiple of the GEMM's panel width (as
        the decoder stack's MLP runs)."""
        tokens, in_features = self._fits(x)
        inter = self.out_features // 2
        if self.out_features % 2:
            raise ValueError(f"{self.out_features} outputs are not a gate's and an up's")
        gate_up, out = x.new_empty(tokens, 2 * inter), x.new_empty(tokens, inter)
        status = load().linear_silu_mul(x.data_ptr(), *self._weight, gate_up.data_ptr(),
                                        out.data_ptr(), _bf16(x), tokens, inter, in_features,
                                        torch.get_num_threads())
        _linear_status(status, f"a [{tokens}, {in_features}] input's")
        return out

    def _fits(self, x: Tensor) -> tuple[int, int]:
        tokens, in_features = x.shape
        if in_features != self.in_features:
            raise ValueError(f"a [{tokens}, {in_features}] input does not fit weight panels "
                             f"{tuple(self.panels.shape)} of {self.out_features} outputs")
        if not x.is_contiguous():
            raise ValueError("the CPU kernels take contiguous tensors")
        if self.amx and x.dtype != torch.bfloat16:
            raise ValueError(f"a bf16 model's weight packed for AMX tiles takes bfloat16 "
                             f"inputs, not {x.dtype}")
        return tokens, in_features


def _linear_status(status: int, inputs: str) -> None:
    """Raises what a nonzero status of ``linear`` means (``inputs``: whose row panels)."""
    if status == -2:
        raise MemoryError(f"linear: no memory for {inputs} row panels")
    if status:
        raise ValueError("linear rejected its arguments")


class _Linear(ctypes.Structure):  # decoder.c's structures, field for field
    _fields_ = [("panels", _PTR), ("bf16", _I64), ("bias", _PTR)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _PTR), ("post_norm", _PTR), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("k_cache", _PTR), ("v_cache", _PTR)]


class _Decoder(ctypes.Structure):
    _fields_ = ([(name, _I64) for name in (
        "num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "inter", "act_bf16",
        "kv_bf16", "block_size", "num_slots", "num_positions")]
        + [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", _PTR), ("sin", _PTR),
           ("final_norm", _PTR), ("layers", ctypes.POINTER(_Layer))])


class _Step(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("tokens", "num_seqs", "max_blocks")] + [
        (name, _PTR) for name in ("positions", "slots", "block_tables", "query_start",
                                  "seq_lens")]


class LayerWeights(NamedTuple):
    """One decoder layer as ``DecoderStack`` runs it: its norms' weights (``[hidden]``, in the
    activations' dtype), its projections packed for ``linear`` (q/k/v and gate/up merged,
    gate's columns first) and its KV cache."""

    input_norm: Tensor
    qkv: PackedWeight
    o: PackedWeight
    post_norm: Tensor
    gate_up: PackedWeight
    down: PackedWeight
    k_cache: Tensor
    v_cache: Tensor


class DecoderStack:
    """A Llama-family decoder stack (``layers``, then the RMSNorm of ``final_norm``) run by
    one kernel call per step (``decoder_forward`` in decoder.c): the kernels of the per-op
    wrappers above, in the model's order, with no Python between them. RoPE reads ``cos``
    and ``sin`` (float32 ``[max_positions, head_dim / 2]``); ``scale`` is attention's.
    Holds the tensors it points at; their storage must not move while it lives."""

    def __init__(self, layers: list[LayerWeights], final_norm: Tensor, cos: Tensor,
                 sin: Tensor, num_heads: int, eps: float, scale: float):
        first = layers[0]
        num_slots, num_kv_heads, head_dim = first.k_cache.flatten(0, 1).shape
        hidden = final_norm.shape[0]
        self.hidden, self.dtype = hidden, final_norm.dtype
        _check_contiguous(final_norm, cos, sin)
        if cos.dtype != torch.float32 or sin.dtype != torch.float32:
            raise ValueError("the rotary tables must be float32")
        q_width = num_heads * head_dim
        inter = first.down.in_features
        shapes = {"qkv": (q_width + 2 * num_kv_heads * head_dim, hidden), "o": (hidden, q_width),
                  "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
        for i, layer in enumerate(layers):
            _bf16(layer.input_norm, layer.post_norm, final_norm)
            _kv_bf16(layer.k_cache, layer.v_cache)
            _check_contiguous(layer.input_norm, layer.post_norm)
            if layer.k_cache.shape != first.k_cache.shape or \
                    {layer.input_norm.shape, layer.post_norm.shape} != {(hidden,)}:
                raise ValueError(f"layer {i}'s KV cache is not the first's shape, or its norms "
                                 f"not [{hidden}]")
            for name, shape in shapes.items():
                weight = getattr(layer, name)
                if (weight.out_features, weight.in_features) != shape:
                    raise ValueError(f"layer {i}'s {name} is {weight.out_features}x"
                                     f"{weight.in_features}, not {shape[0]}x{shape[1]}")
        self._tensors = (layers, final_norm, cos, sin)  # what the structures point at
        self._layers = (_Layer * len(layers))(*(_Layer(
            layer.input_norm.data_ptr(), layer.post_norm.data_ptr(),
            *(_Linear(*linear._weight) for linear in (layer.qkv, layer.o, layer.gate_up,
                                                      layer.down)),
            layer.k_cache.data_ptr(), layer.v_cache.data_ptr()) for layer in layers))
        self._decoder = _Decoder(
            len(layers), hidden, num_heads, num_kv_heads, head_dim, inter, _bf16(final_norm),
            _kv_bf16(first.k_cache, first.v_cache), first.k_cache.shape[1], num_slots,
            cos.shape[0], eps, scale, cos.data_ptr(), sin.data_ptr(), final_norm.data_ptr(),
            self._layers)
        self._cos, self._k_cache = cos, first.k_cache  # for the messages of a failure

    def __call__(self, embeddings: Tensor, positions: Tensor, slot_mapping: Tensor,
                 batch: AttentionBatch) -> Tensor:
        """The final norm's output ``[T, hidden]`` for the step's ``embeddings`` (``[T,
        hidden]``, contiguous, summed into in place as the residual stream) at ``positions``,
        whose keys and values go to cache slots ``slot_mapping`` (int64 ``[T]`` each); its
        sequences are ``batch``."""
        tokens = embeddings.shape[0]
        if embeddings.dtype != self.dtype or embeddings.shape[1:] != (self.hidden,):
            raise ValueError(f"the stack takes [T, {self.hidden}] {self.dtype} embeddings, "
                             f"not {tuple(embeddings.shape)} {embeddings.dtype}")
        if batch.rows != tokens or positions.shape != (tokens,) or \
                slot_mapping.shape != (tokens,):
            raise ValueError(f"{tokens} tokens, {positions.shape[0]} positions, "
                             f"{slot_mapping.shape[0]} slots and {batch.rows} query rows "
                             "do not describe one step")
        if positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64:
            raise ValueError("positions and slots must be int64")
        _check_contiguous(embeddings, positions, slot_mapping)
        out = torch.empty_like(embeddings)
        step = _Step(tokens, batch.lens.shape[0], batch.tables.shape[1], positions.data_ptr(),
                     slot_mapping.data_ptr(), batch.tables.data_ptr(), batch.starts.data_ptr(),
                     batch.lens.data_ptr())
        failed = _I64(0)
        status = load().decoder_forward(ctypes.byref(self._decoder), ctypes.byref(step),
                                        embeddings.data_ptr(), out.data_ptr(),
                                        torch.get_num_threads(), ctypes.byref(failed))
        if status:
            self._raise(failed.value, status, tokens)
        return out

    def _raise(self, failed: int, status: int, tokens: int) -> None:
        """Raises what kernel ``failed`` (decoder.c's FAILED_*) returning ``status`` means."""
        kernel = _STACK_KERNELS[failed - 1] if 0 < failed <= len(_STACK_KERNELS) else None
        if kernel == "linear":
            _linear_status(status, f"{tokens} tokens'")
        elif kernel == "rope_write_kv":
            _rope_status(status, self._cos, self._k_cache)
        elif kernel == "paged_attention":
            _attention_status(status, self._k_cache, self._decoder.num_heads)
        elif kernel is None and status == -2:
            raise MemoryError(f"decoder_forward: no memory for {tokens} tokens' activations")
        raise ValueError(f"{kernel or 'decoder_forward'} rejected its arguments")


# decoder.c's FAILED_* from 1 (FAILED_MEMORY, next, is its own allocation)
_STACK_KERNELS = ("add_rms_norm", "linear", "rope_write_kv", "paged_attention")


def _call(name: str, *args) -> None:
    if getattr(load(), name)(*args):
        raise ValueError(f"{name} rejected its arguments")


def _check_contiguous(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the CPU kernels take contiguous tensors")
