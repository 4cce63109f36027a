"""The cache engine: the paged KV cache of every layer, on the device and in CPU swap space."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pagedserve.common.log import get_logger
from pagedserve.executor_svc.cpu_memory import map_kv_pool
from pagedserve.executor_svc.model_config import ModelConfig

log = get_logger("executor")
_POOLS = {"swap_out": ("device", "cpu"), "swap_in": ("cpu", "device"),
          "copies": ("device", "device")}  # (source, destination) pool of each block operation


class CacheEngine:
    """Per layer a K and a V tensor ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    ``kv_caches`` are views of one device pool ``[num_layers, 2, num_blocks, ...]``; ``cpu_caches``
    views of one CPU swap pool kept block-major, ``[num_cpu_blocks, num_layers, 2, ...]``, so that
    a swapped-out block is one piece of host memory (pinned when the device is CUDA). Attention
    never uses a slot its sequence did not write, so neither needs initial values; but on a CPU
    device the pool is written once at start (``cpu_memory.map_kv_pool``) to map its memory
    before the first step, and CPU pools ask for 2 MiB pages. The device pool ends with one more
    block, ``null_block``: zeros that no sequence owns and no plan may name, which pads tables
    for attention.

    Block operations take ``pairs``, an int tensor or array of shape [N, 2], and move all N
    blocks of every layer's K and V by the path ``paths`` names, chosen at start: on CUDA one
    ``kernels.copy_blocks`` launch, which reads and writes the pinned swap pool in place where
    a start-up check shows it can; elsewhere one strided copy per block (all layers at once).
    """

    def __init__(self, model_config: ModelConfig, block_size: int, num_device_blocks: int,
                 num_cpu_blocks: int, dtype: torch.dtype, device: torch.device | str,
                 block_kernel: bool | None = None):
        """``block_kernel`` forces the choice of ``kernels.copy_blocks`` for block operations
        (None: on CUDA; on CPU it runs only in triton's interpreter, for tests)."""
        self.device = device = torch.device(device)
        self.block_size = block_size
        self.dtype = dtype
        self.num_device_blocks = num_device_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.null_block = num_device_blocks
        layers = model_config.num_layers
        block = (block_size, model_config.num_kv_heads, model_config.head_dim)
        pool = _allocate((layers, 2, num_device_blocks + 1, *block), dtype, device, populate=True)
        pool[:, :, self.null_block].zero_()
        self.kv_caches = [(pool[layer, 0], pool[layer, 1]) for layer in range(layers)]
        swap = _allocate((num_cpu_blocks, layers, 2, *block), dtype, torch.device("cpu"),
                         populate=False, pin_memory=device.type == "cuda")
        self.cpu_caches = [(swap[:, layer, 0], swap[:, layer, 1]) for layer in range(layers)]
        # Both pools as [num_blocks, planes, block_numel]: a plane is one layer's K or V.
        numel = math.prod(block)
        self._blocks = {"device": pool.view(2 * layers, -1, numel).transpose(0, 1),
                        "cpu": swap.view(num_cpu_blocks, 2 * layers, numel)}
        # On CUDA, block operations run on a side stream; the forward pass waits for them.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        chosen = self._choose_movers(device.type == "cuda" if block_kernel is None
                                     else block_kernel)
        self._movers = {op: mover for op, (_, mover) in chosen.items()}
        self.paths = {op: path for op, (path, _) in chosen.items()}

    def _choose_movers(self, block_kernel: bool) -> dict[str, tuple[str, Callable]]:
        """Each block operation's path and mover: one kernel launch where ``block_kernel``
        (for swaps only where the kernel can address the swap pool), else a copy per block."""
        each = ("a strided copy per block", _copy_each)
        if not block_kernel:
            return dict.fromkeys(_POOLS, each)
        from pagedserve.kernels.cache_ops import copy_blocks  # triton, only where it compiles

        def launch(src: Tensor, dst: Tensor, pairs: Tensor) -> None:
            copy_blocks(src, dst, pairs.to(self.device, non_blocking=True))

        # Compiled now rather than at the first copy-on-write (the null block onto itself).
        null = torch.full((1, 2), self.null_block, dtype=torch.int64)
        launch(self._blocks["device"], self._blocks["device"], null)
        one = ("one copy_blocks launch", launch)
        swaps = one if self._reaches_swap_pool(launch) else each
        return {"swap_out": swaps, "swap_in": swaps, "copies": one}

    def _reaches_swap_pool(self, launch) -> bool:
        """Whether ``launch`` moves a block to the pinned swap pool and back intact (device
        block 0, unowned at start, as the sample)."""
        if not self.num_cpu_blocks or not self.num_device_blocks:
            return False
        device, cpu = self._blocks["device"], self._blocks["cpu"]
        pair = torch.zeros(1, 2, dtype=torch.int64)
        device[0].copy_(torch.arange(device[0].numel(), dtype=torch.float32).remainder(97)
                        .view(device[0].shape))
        try:
            launch(device, cpu, pair)
            self.synchronize()
            out = torch.equal(cpu[0], device[0].cpu())
            device[0].zero_()
            launch(cpu, device, pair)
            self.synchronize()
            return out and torch.equal(device[0].cpu(), cpu[0])
        except (ValueError, RuntimeError) as exc:  # triton refuses a pointer it cannot reach
            log.info("swaps copy block by block: copy_blocks cannot reach the pinned swap pool",
                     error=str(exc))
            return False

    def synchronize(self) -> None:
        """Wait for the block operations issued so far (on CUDA they run on a side stream and
        may write the swap pool after the call returns); then the host may read the pools."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        """The block operations' paths in a line, for the log and ``pagedserve health``."""
        if len(set(self.paths.values())) == 1:
            return next(iter(self.paths.values()))
        return "; ".join(f"{op}: {path}" for op, path in self.paths.items())

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
        self._move("swap_out", pairs)

    def swap_in(self, pairs) -> None:
        """Copy CPU swap blocks to the device: ``pairs`` of (cpu_block, device_block)."""
        self._move("swap_in", pairs)

    def copy_blocks(self, pairs) -> None:
        """Copy device blocks to device blocks (copy-on-write): ``pairs`` of (src, dst).

        The copies run as one batch, not in order, so no block may be both a source and a
        destination (the scheduler copies only into freshly allocated blocks).
        """
        self._move("copies", pairs)

    def check(self, swap_out, swap_in, copies) -> BlockOps:
        """These operations, checked (``apply`` runs them); ``ValueError`` naming the bad
        block id if any of them is invalid."""
        return BlockOps(*(self._check(op, pairs) for op, pairs in
                          zip(BlockOps._fields, (swap_out, swap_in, copies))))

    def apply(self, ops: BlockOps) -> None:
        """Run checked operations, swap out first: a block swapped out here may be swapped or
        copied into by the same plan."""
        for op, pairs in zip(BlockOps._fields, ops):
            self._run(op, pairs)

    def _check(self, op: str, pairs) -> Tensor:
        pairs = np.asarray(pairs.cpu() if isinstance(pairs, Tensor) else pairs, dtype=np.int64)
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"{op}: pairs must have shape [N, 2], got {list(pairs.shape)}")
        for ids, pool in zip(pairs.T, _POOLS[op]):
            size = self.num_device_blocks if pool == "device" else self.num_cpu_blocks
            bad = ids[(ids < 0) | (ids >= size)]
            if len(bad):
                raise ValueError(f"{op}: block id {bad[0]} is outside the {pool} pool "
                                 f"[0, {size})")
        src, dst = pairs.T.tolist()
        if len(set(dst)) < len(dst):
            raise ValueError(f"{op}: a destination block appears twice in {dst}")
        if op == "copies" and set(src) & set(dst):
            raise ValueError(f"copies: block ids {sorted(set(src) & set(dst))} are both a "
                             f"source and a destination")
        return torch.from_numpy(np.ascontiguousarray(pairs))

    def _move(self, op: str, pairs) -> None:
        self._run(op, self._check(op, pairs))

    def _run(self, op: str, pairs: Tensor) -> None:
        if len(pairs):
            with self._side_stream():
                self._movers[op](*(self._blocks[pool] for pool in _POOLS[op]), pairs)

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


class BlockOps(NamedTuple):
    """A plan's block operations as ``CacheEngine.check`` passed them: ``[N, 2]`` int64 pairs
    each, in the order ``CacheEngine.apply`` runs them."""

    swap_out: Tensor  # (device block, cpu block)
    swap_in: Tensor  # (cpu block, device block)
    copies: Tensor  # (device source, device destination)


def _copy_each(src: Tensor, dst: Tensor, pairs: Tensor) -> None:
    for s, d in pairs.tolist():  # non-blocking: the side stream orders what reads them
        dst[d].copy_(src[s], non_blocking=True)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, populate: bool,
              pin_memory: bool = False) -> Tensor:
    pool = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory)
    if device.type == "cpu" and not pin_memory:
        map_kv_pool(pool, populate=populate)
    return pool
