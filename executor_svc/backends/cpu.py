"""The compiled CPU kernels (``executor_svc.cpu_kernels``) as an attention backend and as
layer ops: float32 or bfloat16 activations on a CPU where the kernels built.

Each op here is one kernel call. A faster variant of an op for this CPU (another instruction
set, chosen at start-up) belongs in these classes, so that the model and the sampler, which
call the ops bound at load, never learn of it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.attention import AttentionBackend, AttentionMetadata, StepLayout
from pagedserve.executor_svc.layer_ops import LayerOps, PackedLinear
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
        return CpuMetadata(self, **self._common(layout), batch=batch)

    def rope_write_kv(self, qkv: Tensor, num_heads: int, rope: StepRope,
                      kv_cache: tuple[Tensor, Tensor],
                      meta: AttentionMetadata) -> tuple[Tensor, Tensor, Tensor]:
        return cpu_kernels.rope_write_kv(qkv, num_heads, kv_cache[0].shape[2], rope.table.cos,
                                         rope.table.sin, rope.positions, *kv_cache,
                                         meta.slot_mapping)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor,
               v_cache: Tensor, meta: CpuMetadata, scale: float) -> Tensor:
        return cpu_kernels.paged_attention(query, k_cache, v_cache, meta.batch, scale)


class CpuOps(LayerOps):
    """The layer ops, each fused into one kernel call."""

    name = "cpu"

    def add_rms_norm(self, x: Tensor | None, residual: Tensor, weight: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
        """The sum is written into ``residual``."""
        return cpu_kernels.add_rms_norm(x, residual, weight, eps), residual

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return cpu_kernels.silu_mul(gate_up)

    def greedy(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return cpu_kernels.greedy(logits.contiguous())

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
