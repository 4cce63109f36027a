"""The cache engine: the paged KV cache of every layer, on the device and in CPU swap space."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from pagedserve.executor_svc.cpu_memory import map_kv_pool
from pagedserve.executor_svc.model_config import ModelConfig

_POOLS = {"swap_out": ("device", "cpu"), "swap_in": ("cpu", "device"),
          "copies": ("device", "device")}  # (source, destination) pool of each block operation


class CacheEngine:
    """Per layer a K and a V tensor ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    ``kv_caches`` live on the device; ``cpu_caches`` (pinned when the device is CUDA, for async
    copies) hold swapped-out blocks. Attention never uses a slot its sequence did not write, so
    neither needs initial values; but on a CPU device the caches are written once at start
    (``cpu_memory.map_kv_pool``) to map their memory before the first step, and CPU pools ask for
    2 MiB pages. The device caches end with one more block, ``null_block``:
    zeros that no sequence owns and no plan may name, which pads tables for attention.
    Block operations take ``pairs``, an int tensor or array of shape [N, 2], and move all N blocks
    of every layer's K and V at once.
    """

    def __init__(self, model_config: ModelConfig, block_size: int, num_device_blocks: int,
                 num_cpu_blocks: int, dtype: torch.dtype, device: torch.device | str):
        self.device = device = torch.device(device)
        self.block_size = block_size
        self.dtype = dtype
        self.num_device_blocks = num_device_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.null_block = num_device_blocks
        self.kv_caches = _allocate(model_config, block_size, num_device_blocks + 1, dtype,
                                   populate=True, device=device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[self.null_block].zero_()
            v_cache[self.null_block].zero_()
        self.cpu_caches = _allocate(model_config, block_size, num_cpu_blocks, dtype, populate=False,
                                    device=torch.device("cpu"), pin_memory=device.type == "cuda")
        # On CUDA, block operations run on a side stream; the forward pass waits for them.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @staticmethod
    def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V."""
        per_layer = block_size * model_config.num_kv_heads * model_config.head_dim * dtype.itemsize
        return 2 * model_config.num_layers * per_layer

    @staticmethod
    def num_blocks_for_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype,
                             num_bytes: int) -> int:
        """How many whole blocks fit in ``num_bytes`` (e.g. ``--kv-cache-gb`` * 2**30)."""
        return int(num_bytes // CacheEngine.bytes_per_block(model_config, block_size, dtype))

    def swap_out(self, pairs) -> None:
        """Copy device blocks to CPU swap space: ``pairs`` of (device_block, cpu_block)."""
        self._copy(self.kv_caches, self.cpu_caches, self._check("swap_out", pairs))

    def swap_in(self, pairs) -> None:
        """Copy CPU swap blocks to the device: ``pairs`` of (cpu_block, device_block)."""
        self._copy(self.cpu_caches, self.kv_caches, self._check("swap_in", pairs))

    def copy_blocks(self, pairs) -> None:
        """Copy device blocks to device blocks (copy-on-write): ``pairs`` of (src, dst).

        The copies run as one batch, not in order, so no block may be both a source and a
        destination (the scheduler copies only into freshly allocated blocks).
        """
        self._copy(self.kv_caches, self.kv_caches, self._check("copies", pairs))

    def check(self, swap_out, swap_in, copies) -> None:
        """Raise ``ValueError`` naming the bad block id if any of these operations is invalid."""
        for op, pairs in (("swap_out", swap_out), ("swap_in", swap_in), ("copies", copies)):
            self._check(op, pairs)

    def _check(self, op: str, pairs) -> Tensor:
        pairs = torch.as_tensor(pairs, dtype=torch.int64).cpu()
        if pairs.dim() != 2 or pairs.shape[1] != 2:
            raise ValueError(f"{op}: pairs must have shape [N, 2], got {list(pairs.shape)}")
        if not len(pairs):  # most steps: nothing to check (the checks' tensor ops cost 20 us)
            return pairs
        for ids, pool in zip(pairs.T, _POOLS[op]):
            size = self.num_device_blocks if pool == "device" else self.num_cpu_blocks
            bad = ids[(ids < 0) | (ids >= size)]
            if len(bad):
                raise ValueError(f"{op}: block id {bad[0].item()} is outside the {pool} pool "
                                 f"[0, {size})")
        src, dst = pairs.T.tolist()
        if len(set(dst)) < len(dst):
            raise ValueError(f"{op}: a destination block appears twice in {dst}")
        if op == "copies" and set(src) & set(dst):
            raise ValueError(f"copies: block ids {sorted(set(src) & set(dst))} are both a "
                             f"source and a destination")
        return pairs

    def _copy(self, src_caches: list[tuple[Tensor, Tensor]],
              dst_caches: list[tuple[Tensor, Tensor]], pairs: Tensor) -> None:
        if not len(pairs):
            return
        with self._side_stream():
            src_ids = pairs[:, 0].to(src_caches[0][0].device)
            dst_ids = pairs[:, 1].to(dst_caches[0][0].device)
            for src_layer, dst_layer in zip(src_caches, dst_caches, strict=True):
                for src, dst in zip(src_layer, dst_layer):
                    dst.index_copy_(0, dst_ids, _to(src.index_select(0, src_ids), dst.device))

    @contextlib.contextmanager
    def _side_stream(self):
        if self._stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # the last forward pass may still write these blocks
        with torch.cuda.stream(self._stream):
            yield
        compute.wait_stream(self._stream)  # the next forward pass reads what was copied


def _to(blocks: Tensor, device: torch.device) -> Tensor:
    # Blocks bound for the host are copied synchronously, since the host-side index_copy_ that
    # follows must not read them before they land; device-bound ones stay queued on the stream.
    return blocks.to(device, non_blocking=device.type != "cpu")


def _allocate(config: ModelConfig, block_size: int, num_blocks: int, dtype: torch.dtype,
              populate: bool, **where) -> list[tuple[Tensor, Tensor]]:
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    caches = [(torch.empty(shape, dtype=dtype, **where), torch.empty(shape, dtype=dtype, **where))
              for _ in range(config.num_layers)]
    if where["device"].type == "cpu" and not where.get("pin_memory"):
        for cache in caches:
            for tensor in cache:
                map_kv_pool(tensor, populate=populate)
    return caches
