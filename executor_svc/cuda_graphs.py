"""Pure-decode steps replayed from CUDA graphs.

A decode step of a small model is mostly kernel launches: on an H200, SmolLM2's 32-sequence
decode step spent 2.5 ms on the GPU and about 25 ms launching some 900 kernels from Python
(BENCHMARKS.md, "GPU"). So, as vLLM does, the model's forward for a step in which every
sequence computes one token is captured once per batch-size bucket and replayed: one launch
per step.

A graph replays fixed addresses and shapes. Its inputs are static buffers, refilled before each
replay: token ids, positions, cache slots, context lengths and block tables, the tables at the
full width of ``max_model_len``, so that the decode kernel's launch (split-K, partitions) is
fixed at capture. A batch of ``n`` runs in the smallest bucket ``b >= n``; rows ``n..b`` are
padding: slot -1 (no cache write) and a one-token context in the null block (zeros), so they
stay finite and write nothing. Only the triton backend is captured; it makes no host sync.

The graph ends in the step's logits and their greedy tokens (``DecodeOutput``): the LM head
and the greedy kernel replay with the layers, and a step whose rows all sample greedily takes
its tokens as they are; any other sampling reads the graph's logits.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pagedserve.executor_svc.attention import AttentionMetadata
from pagedserve.executor_svc.model import PagedLlamaForCausalLM

if TYPE_CHECKING:  # for the hints only: triton is imported when its backend is chosen
    from pagedserve.executor_svc.backends.triton import TritonBackend

MAX_BUCKET = 512


class DecodeOutput(NamedTuple):
    """A decode step's outputs, row i sequence i's: views of a graph's static buffers, valid
    until the next replay (on the device's stream: work enqueued before it reads them)."""

    hidden: Tensor  # [n, hidden]
    logits: Tensor  # [n, vocab], the model's dtype
    token_ids: Tensor  # [n] int64: each row's argmax, the first on ties
    logprobs: Tensor  # [n] float32: its log-probability


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes given a graph: 1, 2, 4, then every multiple of 8 up to the first one that
    holds ``max_num_seqs`` (at most ``MAX_BUCKET``)."""
    limit = min(max_num_seqs, MAX_BUCKET)
    buckets = []
    for size in (1, 2, 4, *range(8, MAX_BUCKET + 1, 8)):
        buckets.append(size)
        if size >= limit:
            return buckets
    return buckets


class DecodeGraphs:
    """Static inputs and one graph per bucket for ``model`` over ``kv_caches``, ending in
    ``greedy`` (the sampler's: logits to argmax tokens and their logprobs).

    ``capture=False`` runs the same padded static-buffer forward eagerly: what the tests use
    without a GPU, and a fallback with the same numerics."""

    def __init__(self, model: PagedLlamaForCausalLM, kv_caches: list[tuple[Tensor, Tensor]],
                 backend: TritonBackend, greedy: Callable[[Tensor], tuple[Tensor, Tensor]],
                 block_size: int, null_block: int, max_num_seqs: int, max_model_len: int,
                 capture: bool = True):
        if backend.name != "triton":
            raise ValueError(f"decode graphs need the triton attention backend, not "
                             f"{backend.name!r}: it makes no host sync")
        self.model, self.kv_caches, self.backend, self.greedy = model, kv_caches, backend, greedy
        self.block_size, self.null_block = block_size, null_block
        self.width = -(-max_model_len // block_size)  # blocks per table
        self.buckets = batch_buckets(max_num_seqs)
        device = kv_caches[0][0].device
        size = self.buckets[-1]
        self.inputs = _StepInputs(size, self.width, device)
        (self.input_ids, self.positions, self.slot_mapping, self.seq_lens,
         self.block_tables) = self.inputs.device
        self._fill(size, [], [], [])  # every row padding, as the captures run them
        self.query_start_loc = torch.arange(size + 1, device=device)  # one token per sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, DecodeOutput] = {}
        self.steps = 0  # steps run here
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def serves(self, num_seqs: int, max_blocks: int) -> bool:
        return 0 < num_seqs <= self.max_batch and max_blocks <= self.width

    @torch.inference_mode()
    def run(self, token_ids: list[int], num_computed: list[int], tables: list[list[int]],
            adjust: Callable[[Tensor], None] | None = None) -> DecodeOutput:
        """The outputs of one new token for each of ``n`` sequences: token ``token_ids[i]``
        at position ``num_computed[i]`` of the sequence whose blocks are ``tables[i]``;
        ``adjust`` may then change the token ids on the device (``[n]``) before the replay."""
        num_seqs = len(token_ids)
        bucket = next(b for b in self.buckets if b >= num_seqs)
        self._fill(bucket, token_ids, num_computed, tables)
        if adjust is not None:
            adjust(self.input_ids[:num_seqs])
        self.steps += 1
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            out = self.outputs[bucket]
        else:
            out = self._forward(bucket)
        return DecodeOutput(*(t[:num_seqs] for t in out))

    def _fill(self, bucket: int, token_ids: list[int], num_computed: list[int],
              tables: list[list[int]]) -> None:
        num_seqs = len(token_ids)
        ids, positions, slots, lens, padded = self.inputs.host()
        ids[:num_seqs], ids[num_seqs:bucket] = token_ids, 0
        positions[:num_seqs], positions[num_seqs:bucket] = num_computed, 0
        padded[:bucket] = self.null_block
        for row, table in enumerate(tables):
            padded[row, :len(table)] = table
        computed = positions[:num_seqs]
        blocks = padded[np.arange(num_seqs), computed // self.block_size].astype(np.int64)
        slots[:num_seqs] = blocks * self.block_size + computed % self.block_size
        slots[num_seqs:bucket] = -1
        lens[:num_seqs], lens[num_seqs:bucket] = computed + 1, 1
        self.inputs.send(bucket)

    def _meta(self, bucket: int) -> AttentionMetadata:
        return self.backend.decode_metadata(
            self.positions[:bucket], self.slot_mapping[:bucket],
            self.query_start_loc[:bucket + 1], self.seq_lens[:bucket],
            self.block_tables[:bucket], max_seq_len=self.width * self.block_size)

    def _forward(self, bucket: int) -> DecodeOutput:
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket],
                            self._meta(bucket), self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return DecodeOutput(hidden, logits, *self.greedy(logits))

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first, all in one memory pool: each smaller graph reuses the
        largest one's activations. A warm-up forward before each capture compiles the
        kernels and sets up cuBLAS outside the graph."""
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in reversed(self.buckets):
                self._forward(bucket)  # padding rows only: slots -1, nothing is written
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[bucket] = self._forward(bucket)
                pool = graph.pool()
                self.graphs[bucket] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()


class _StepInputs:
    """The graphs' step inputs in one buffer on each side: a step writes them on the host
    (pinned on CUDA) and sends them in one asynchronous copy, where a copy from pageable memory
    holds the host until it is staged, one per input. ``device`` holds the static views the
    graphs read: token ids, positions and cache slots (int64), context lengths and block tables
    ``[rows, width]`` (int32); the tables come last, so that a step of fewer rows copies only
    its rows of them."""

    _DTYPES = (torch.int64, torch.int64, torch.int64, torch.int32, torch.int32)

    def __init__(self, rows: int, width: int, device: torch.device):
        shapes = [(rows,)] * 4 + [(rows, width)]
        sizes = [-(-math.prod(shape) * dtype.itemsize // 8) * 8  # 8-byte aligned
                 for dtype, shape in zip(self._DTYPES, shapes)]
        self.offsets = np.cumsum([0, *sizes]).tolist()
        self.row_bytes = width * torch.int32.itemsize
        cuda = device.type == "cuda"
        self._host_bytes = torch.empty(self.offsets[-1], dtype=torch.uint8, pin_memory=cuda)
        self._device_bytes = torch.empty(self.offsets[-1], dtype=torch.uint8, device=device)
        self.device = self._views(self._device_bytes, shapes)
        self._host = [view.numpy() for view in self._views(self._host_bytes, shapes)]
        self._sent = torch.cuda.Event() if cuda else None

    def _views(self, buffer: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [buffer[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for dtype, shape, start in zip(self._DTYPES, shapes, self.offsets)]

    def host(self) -> list[np.ndarray]:
        """The host views (ids, positions, slots, lens, tables), once the last copy from them
        is done."""
        if self._sent is not None:
            self._sent.synchronize()
        return self._host

    def send(self, rows: int) -> None:
        """Copy the host buffer to the device: every input, and ``rows`` rows of the tables."""
        end = self.offsets[-2] + rows * self.row_bytes
        self._device_bytes[:end].copy_(self._host_bytes[:end], non_blocking=True)
        if self._sent is not None:
            self._sent.record()
