"""The compiled CPU kernels (``executor_svc.cpu_kernels``) as an attention backend and as
layer ops: float32 or bfloat16 activations on a CPU where the kernels built.

Each op here is one kernel call. A faster variant of an op for this CPU (another instruction
set, chosen at start-up) belongs in these classes, so that the model and the sampler, which
call the ops bound at load, never learn of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.attention import AttentionBackend, AttentionMetadata, StepLayout
from pagedserve.executor_svc.layer_ops import BucketedLinear, KernelOps, PackedLinear
from pagedserve.executor_svc.rope import StepRope


@dataclass
class CpuMetadata(AttentionMetadata):
    """The step's sequences as the attention kernel reads them, for every layer."""

    batch: cpu_kernels.AttentionBatch


class CpuBackend(AttentionBackend):
    """Decode rows and prompts in one kernel call per layer, each new token reading its
    context in place through its block table; RoPE and the K/V write fused in one more."""

    name = "cpu"

    def __init__(self, block_size: int):
        super().__init__(block_size, "cpu")

    def build(self, block_tables: list[list[int]], num_computed_tokens: list[int],
              query_lens: list[int]) -> CpuMetadata:
        layout = StepLayout.build(block_tables, num_computed_tokens, query_lens, self.block_size)
        batch = cpu_kernels.attention_batch(layout.block_tables, layout.query_start_loc,
                                            layout.seq_lens)
        # The layout is on the host already: no copies to the device (``_common``).
        return CpuMetadata(self, positions=layout.positions, slot_mapping=layout.slot_mapping,
                           query_start_loc=layout.query_start_loc, batch=batch)

    def rope_write_kv(self, qkv: Tensor, num_heads: int, rope: StepRope,
                      kv_cache: tuple[Tensor, Tensor],
                      meta: AttentionMetadata) -> tuple[Tensor, Tensor, Tensor]:
        return cpu_kernels.rope_write_kv(qkv, num_heads, kv_cache[0].shape[2], rope.table.cos,
                                         rope.table.sin, rope.positions, *kv_cache,
                                         meta.slot_mapping)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor,
               v_cache: Tensor, meta: CpuMetadata, scale: float) -> Tensor:
        return cpu_kernels.paged_attention(query, k_cache, v_cache, meta.batch, scale)

    def from_rows(self, k_cache: Tensor, v_cache: Tensor,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """In pair layout where the kernels keep one (``cpu_kernels.pair_layout``)."""
        if cpu_kernels.pair_layout(dtype, k_cache):
            return cpu_kernels.paired(k_cache, v_cache)
        return k_cache, v_cache

    def to_rows(self, k_cache: Tensor, v_cache: Tensor,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if cpu_kernels.pair_layout(dtype, k_cache):
            return cpu_kernels.unpaired(k_cache, v_cache)
        return k_cache, v_cache


class CpuOps(KernelOps):
    """The layer ops, each fused into one call of the C kernels; the linear layers on our
    GEMM."""

    name = "cpu"
    kernels = cpu_kernels

    def pack_linear(self, weight: Tensor, bias: Tensor | None) -> PackedLinear:
        return KernelLinear(weight, bias)


class KernelLinear(PackedLinear):
    """Our GEMM's weight panels (``cpu_kernels.PackedWeight``), bfloat16 where every weight
    is a bfloat16 value."""

    name = "cpu"

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__(weight)
        self.kernel = cpu_kernels.PackedWeight(weight.detach(), bias)

    def matmul(self, x: Tensor) -> Tensor:
        return self.kernel(x.contiguous())


class FusedDecoder:
    """A model's decoder stack over ``kv_caches`` in one kernel call per step
    (``cpu_kernels.DecoderStack``), for the steps whose every linear layer is our GEMM for
    their number of rows (as chosen per bucket of rows); the model's forward runs them here
    (``PagedLlamaForCausalLM.stack``). Its per-op path calls the same kernels in the same
    order, with a module call, a ctypes conversion and a new tensor between each two. The
    stack's norms and SiLU-mul are our kernels whichever the per-op path was given:
    ``autotune`` times those one call from Python at a time, where ours and torch's tie
    (BENCHMARKS.md, "A decoder stack in one call"). ``build`` gives None where no step would
    be served (another attention backend, tensor parallelism, linear layers not ours)."""

    def __init__(self, model: nn.Module, kv_caches: list[tuple[Tensor, Tensor]]):
        self.embed_tokens, self.kv_caches = model.model.embed_tokens, kv_caches
        layers = model.model.layers
        linears = [linear for layer in layers for linear in _projections(layer)]
        limits = sorted({limit for linear in linears if isinstance(linear, BucketedLinear)
                         for limit in linear.limits})
        # each bucket as its largest row count, and the last as one row past the others
        buckets = [(limit, limit) for limit in limits] + [(None, (limits or [0])[-1] + 1)]
        self._stacks: list[tuple[int | None, cpu_kernels.DecoderStack | None]] = []
        built: dict[tuple[int, ...], cpu_kernels.DecoderStack] = {}
        for limit, rows in buckets:
            chosen = [linear.serving(rows) if isinstance(linear, PackedLinear) else linear
                      for linear in linears]
            stack = None
            if all(isinstance(linear, KernelLinear) for linear in chosen):
                key = tuple(map(id, chosen))
                if key not in built:
                    built[key] = _stack_of(model, chosen, kv_caches)
                stack = built[key]
            self._stacks.append((limit, stack))

    @classmethod
    def build(cls, model: nn.Module, attention: AttentionBackend,
              kv_caches: list[tuple[Tensor, Tensor]]) -> FusedDecoder | None:
        """The fused stack of ``model`` over ``kv_caches``, or None where it serves no step."""
        if not isinstance(attention, CpuBackend) or model.tp is not None:
            return None
        fused = cls(model, kv_caches)
        return fused if any(stack for _, stack in fused._stacks) else None

    def serves(self, rows: int, meta: AttentionMetadata,
               kv_caches: list[tuple[Tensor, Tensor]]) -> bool:
        """Whether a step of ``rows`` new tokens described by ``meta`` over ``kv_caches``
        runs here."""
        return (kv_caches is self.kv_caches and isinstance(meta, CpuMetadata)
                and self._stack(rows) is not None)

    def __call__(self, input_ids: Tensor, positions: Tensor, meta: CpuMetadata) -> Tensor:
        """The final norm's output ``[T, hidden]`` for a step's ``input_ids`` at
        ``positions`` (as the model's forward gives it), their K/V written to the cache on
        the way."""
        return self._stack(len(input_ids))(self.embed_tokens(input_ids), positions,
                                           meta.slot_mapping, meta.batch)

    def describe(self) -> str:
        """Which steps run here, for ``backends.chosen``."""
        served = [limit for limit, stack in self._stacks if stack is not None]
        if len(served) == len(self._stacks):
            return "one call per step"
        last_bound = self._stacks[-2][0]  # more than one bucket: not all of them served
        parts = [f"<={limit}" if limit is not None else f">{last_bound}" for limit in served]
        return f"one call per step of {', '.join(parts)} rows, else a call per op"

    def _stack(self, rows: int) -> cpu_kernels.DecoderStack | None:
        for limit, stack in self._stacks:
            if limit is None or rows <= limit:
                return stack
        return None


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    """A decoder layer's linear layers, in the order ``LayerWeights`` takes them."""
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj)


def _stack_of(model: nn.Module, linears: list[KernelLinear],
              kv_caches: list[tuple[Tensor, Tensor]]) -> cpu_kernels.DecoderStack:
    """``model``'s stack with each layer's projections from ``linears`` (four per layer)."""
    layers = model.model.layers
    weights = [cpu_kernels.LayerWeights(
        layer.input_layernorm.weight, linears[4 * i].kernel, linears[4 * i + 1].kernel,
        layer.post_attention_layernorm.weight, linears[4 * i + 2].kernel,
        linears[4 * i + 3].kernel, *kv_cache)
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True))]
    attention = layers[0].self_attn
    return cpu_kernels.DecoderStack(weights, model.model.norm.weight, model.rope.cos,
                                    model.rope.sin, attention.num_heads, model.config.rms_norm_eps,
                                    attention.scale)
