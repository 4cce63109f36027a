"""The ``triton`` attention backend, the paged kernels of ``kernels``, and the layer ops in
Triton (``TritonOps``).

On CUDA the kernels compile for the device; on CPU tensors they run only in triton's
interpreter (``TRITON_INTERPRET=1``, set before this module is imported): exact but slow,
which is what the tests use.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pagedserve import kernels
from pagedserve.executor_svc.attention import AttentionBackend, AttentionMetadata, StepLayout
from pagedserve.executor_svc.layer_ops import KernelOps
from pagedserve.executor_svc.rope import StepRope
from pagedserve.executor_svc.transfer import to_device
from pagedserve.kernels import layer_ops as layer_kernels


@dataclass
class TritonMetadata(AttentionMetadata):
    """What the kernels read besides the shared fields: int32 tables and lengths."""

    seq_lens: Tensor  # [S] int32: context length of each sequence after this step
    block_tables: Tensor  # [S, max_blocks] int32, padded (never read past seq_lens)
    max_query_len: int
    max_seq_len: int


class TritonBackend(AttentionBackend):
    """A pure decode step (one new token per sequence) takes the decode kernel; a step with
    prompt tokens takes the prefill kernel for all its sequences, decodes included."""

    name = "triton"

    def build(self, block_tables: list[list[int]], num_computed_tokens: list[int],
              query_lens: list[int]) -> TritonMetadata:
        layout = StepLayout.build(block_tables, num_computed_tokens, query_lens, self.block_size)
        return TritonMetadata(self, **self._common(layout),
                              seq_lens=to_device(layout.seq_lens.int(), self.device),
                              block_tables=to_device(layout.block_tables.int(), self.device),
                              max_query_len=max(query_lens, default=0),
                              max_seq_len=int(layout.seq_lens.max()) if block_tables else 0)

    def decode_metadata(self, positions: Tensor, slot_mapping: Tensor, query_start_loc: Tensor,
                        seq_lens: Tensor, block_tables: Tensor,
                        max_seq_len: int) -> TritonMetadata:
        """A pure decode step's metadata over device buffers filled elsewhere (the decode
        graphs' static inputs), with no host work."""
        return TritonMetadata(self, positions, slot_mapping, query_start_loc, seq_lens,
                              block_tables, max_query_len=1, max_seq_len=max_seq_len)

    def rope_write_kv(self, qkv: Tensor, num_heads: int, rope: StepRope,
                      kv_cache: tuple[Tensor, Tensor],
                      meta: AttentionMetadata) -> tuple[Tensor, Tensor, Tensor]:
        """One kernel: the rotation and the cache write (``kernels.layer_ops``)."""
        return layer_kernels.rope_write_kv(qkv, num_heads, rope.table.cos, rope.table.sin,
                                           rope.positions, *kv_cache, meta.slot_mapping)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, k_cache: Tensor,
               v_cache: Tensor, meta: TritonMetadata, scale: float) -> Tensor:
        """``key`` and ``value`` are read from the cache, where they were written."""
        if meta.max_query_len == 1:
            return kernels.paged_decode_attention(query, k_cache, v_cache, meta.block_tables,
                                                  meta.seq_lens, scale,
                                                  max_seq_len=meta.max_seq_len)
        return kernels.paged_prefill_attention(query, k_cache, v_cache, meta.block_tables,
                                               meta.seq_lens, meta.query_start_loc, scale,
                                               max_query_len=meta.max_query_len)


class TritonOps(KernelOps):
    """The layer ops on CUDA: residual add + RMSNorm, SiLU-mul and greedy sampling one kernel
    each (``kernels.layer_ops``), where torch's operators take nine, two and five; the linear
    layers stay torch's."""

    name = "triton"
    kernels = layer_kernels
