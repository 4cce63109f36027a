"""Tensor parallelism (Megatron-style) across executor processes, through torch.distributed.

Each rank holds a slice of every layer's attention heads and MLP, and the KV cache of its own
heads; the block tables, and so every block id, are the same on all ranks. Rank 0 talks to the
scheduler: it broadcasts each command (a plan, a new configuration, drop, stop) to the other
ranks, which apply it in lockstep, and after each step it broadcasts the tokens it sampled so
that every rank's mirror of the sequences stays the same. Ranks synchronise only through
these broadcasts and the two all-reduces per layer (after the attention output projection and
after the MLP down projection). gloo on CPU, NCCL on CUDA.

A rank that dies breaks the group: the others' next collective fails (a closed connection, or
``TIMEOUT`` for a rank that hangs), the surviving ranks exit, and the scheduler takes the
executor for dead as when one process crashes.

On CPU, ranks on one host sum through shared memory (``SharedMemorySum``) instead of gloo,
whose all-reduce of one decode step's activations took about 2 ms on the development VM.
"""
from __future__ import annotations

import datetime
import enum
import os
import platform
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pagedserve.common.log import get_logger

log = get_logger("executor")

TIMEOUT = datetime.timedelta(seconds=60)  # a collective of a step: a hung rank fails it
# Between steps the other ranks wait for rank 0's next command as long as it lives (a dead
# rank 0 closes the connection, which fails the wait at once).
IDLE_TIMEOUT = datetime.timedelta(days=365)


class Command(enum.IntEnum):
    """What rank 0 tells the other ranks, one byte ahead of the payload."""

    CONFIGURE = 1  # payload: the encoded ConfigureExecutor
    PLAN = 2       # payload: the encoded StepPlan
    DROP = 3       # the scheduler is gone: drop every sequence and the KV cache
    TRIM = 4       # idle: hand the heap's free memory back (``cpu_memory.release_free_memory``)
    STOP = 5


def check_divisible(num_heads: int, num_kv_heads: int, intermediate_size: int,
                    size: int) -> None:
    """Every rank gets the same number of query heads, KV heads and MLP columns, or a
    ``ValueError`` names the numbers."""
    for name, value in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                        ("intermediate_size", intermediate_size)):
        if value % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide the model's {name} "
                             f"({value}); choose a size that divides {num_heads} attention "
                             f"heads and {num_kv_heads} KV heads")


class TensorParallel:
    """This process's place in the group: ``rank`` of ``size``."""

    def __init__(self, rank: int, size: int, master: str, device: torch.device):
        if not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size})")
        self.rank, self.size, self.device = rank, size, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank,
                                world_size=size, timeout=TIMEOUT)
        # Commands and sampled tokens travel on the CPU, over gloo, whatever the device.
        self._cpu_group = dist.new_group(backend="gloo", timeout=TIMEOUT) \
            if backend != "gloo" else None
        self._commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self._shm = SharedMemorySum.attach(self, master) if device.type == "cpu" else None
        log.info("tensor-parallel group joined", tp_rank=rank, tensor_parallel_size=size,
                 sums="shared memory" if self._shm is not None else backend)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
        if self._shm is not None and self._shm.fits(x):
            return self._shm.all_reduce(x)
        dist.all_reduce(x)
        return x

    def min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (the KV pool every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._cpu_group)
        return int(t.item())

    def send(self, command: Command, payload: bytes = b"") -> None:
        """Rank 0: broadcast a command to the other ranks."""
        self._broadcast_bytes(bytes([command]) + payload)

    def receive(self) -> tuple[Command, bytes]:
        """Other ranks: wait for rank 0's next command."""
        data = self._broadcast_bytes(None)
        return Command(data[0]), data[1:]

    def share_tokens(self, seq_ids: Tensor | None = None,
                     token_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rank 0 gives the tokens it sampled (int32 seq ids and token ids), the others get
        them: every rank appends the same tokens to its sequences."""
        count = torch.tensor([0 if seq_ids is None else len(seq_ids)], dtype=torch.int64)
        dist.broadcast(count, 0, group=self._cpu_group)
        pairs = (torch.stack([seq_ids, token_ids]).to(torch.int64) if self.is_driver
                 else torch.empty(2, int(count.item()), dtype=torch.int64))
        dist.broadcast(pairs, 0, group=self._cpu_group)
        return pairs[0], pairs[1]

    def _broadcast_bytes(self, data: bytes | None) -> bytes:
        size = torch.tensor([0 if data is None else len(data)], dtype=torch.int64)
        dist.broadcast(size, 0, group=self._commands)
        if self.is_driver:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self._commands)
        return buf.numpy().tobytes()


class SharedMemorySum:
    """All-reduce for ranks on one host through a shared memory segment: each rank copies its
    partial sum into its slot, raises its counter, waits (spinning) until every rank's counter
    has reached the same generation, and adds the slots up in rank order, so that every rank
    gets bit-identical sums. Slots alternate between two halves by generation: a rank that
    arrived at generation g has finished reading g - 1, whose half g + 1 then reuses.

    Relies on x86's ordering of plain stores and loads (no fences); elsewhere, when the
    ranks are on different hosts (the segment is not found), and with
    ``PAGEDSERVE_TP_SHARED_MEMORY=0`` on any rank, ``attach`` returns None and gloo sums.
    A rank that dies is noticed within a few milliseconds of spinning (its pid is gone), one
    that hangs after ``TIMEOUT``: either fails the sum with a ``RuntimeError``.
    """

    SLOT_BYTES = 8 << 20  # per rank and half: 2048 tokens x 1024 hidden in float32

    def __init__(self, segment: shared_memory.SharedMemory, rank: int, size: int, owner: bool):
        self.segment, self.rank, self.size, self.owner = segment, rank, size, owner
        header = np.ndarray((2, size), dtype=np.int64, buffer=segment.buf)  # counters, pids
        self.counters, self.pids = header[0], header[1]
        self.data = torch.frombuffer(segment.buf, dtype=torch.uint8, offset=header.nbytes,
                                     count=2 * size * self.SLOT_BYTES).view(2, size, -1)
        self.generation = 0

    @classmethod
    def attach(cls, tp: TensorParallel, master: str) -> SharedMemorySum | None:
        """Every rank of ``tp`` maps rank 0's segment, or None for all of them."""
        name = "pagedserve-tp-" + master.replace(":", "-").replace(".", "-")
        size = 8 * 2 * tp.size + 2 * tp.size * cls.SLOT_BYTES
        segment = None
        ok = (platform.machine() in ("x86_64", "AMD64")
              and os.environ.get("PAGEDSERVE_TP_SHARED_MEMORY", "1") != "0")
        if ok and tp.is_driver:
            try:
                segment = shared_memory.SharedMemory(name, create=True, size=size)
            except OSError:
                ok = False
        tp.min(0)  # a barrier: the segment exists before the other ranks look for it
        if ok and not tp.is_driver:
            try:
                segment = shared_memory.SharedMemory(name)
                # Attached, not created: rank 0 alone unlinks it (Python 3.11 tracks both).
                resource_tracker.unregister(segment._name, "shared_memory")
            except (OSError, ValueError):
                ok = False
        ok = bool(tp.min(int(ok)))
        if tp.is_driver and segment is not None:
            segment.unlink()  # every rank has it mapped (or none needs it): nothing leaks
        if not ok:
            if segment is not None:
                segment.close()
            return None
        shm = cls(segment, tp.rank, tp.size, tp.is_driver)
        shm.counters[tp.rank], shm.pids[tp.rank] = 0, os.getpid()
        tp.min(0)  # every pid is written before the first sum
        return shm

    def fits(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and x.nbytes <= self.SLOT_BYTES and x.is_contiguous()

    def all_reduce(self, x: Tensor) -> Tensor:
        self.generation += 1
        half = self.data[self.generation % 2]
        flat = x.view(-1)
        slots = [half[r, :x.nbytes].view(x.dtype) for r in range(self.size)]
        slots[self.rank].copy_(flat)
        self.counters[self.rank] = self.generation
        self._wait()
        flat.copy_(slots[0])
        for slot in slots[1:]:
            flat.add_(slot)
        return x

    def _wait(self) -> None:
        deadline, check = time.monotonic() + TIMEOUT.total_seconds(), 0
        while self.counters.min() < self.generation:
            check += 1
            if check % 4096:
                continue
            for rank, pid in enumerate(self.pids.tolist()):
                if rank != self.rank and not _alive(pid):
                    raise RuntimeError(f"tensor-parallel rank {rank} (pid {pid}) is gone")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not all reach the sum within "
                                   f"{TIMEOUT.total_seconds():.0f} s")

    def close(self) -> None:
        self.data = self.counters = self.pids = None  # release the buffer before unmapping
        try:
            self.segment.close()
        except BufferError:
            pass  # a view still lives: the mapping goes with the process


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a dead rank started by rank 0 stays a zombie until rank 0, busy
    summing, reaps it, so /proc's state counts, not just the pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc: the pid exists
