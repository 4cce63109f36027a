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
"""
from __future__ import annotations

import datetime
import enum

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT = datetime.timedelta(seconds=60)  # a collective of a step: a hung rank fails it
# Between steps the other ranks wait for rank 0's next command as long as it lives (a dead
# rank 0 closes the connection, which fails the wait at once).
IDLE_TIMEOUT = datetime.timedelta(days=365)


class Command(enum.IntEnum):
    """What rank 0 tells the other ranks, one byte ahead of the payload."""

    CONFIGURE = 1  # payload: the encoded ConfigureExecutor
    PLAN = 2       # payload: the encoded StepPlan
    DROP = 3       # the scheduler is gone: drop every sequence and the KV cache
    TRIM = 4       # idle: hand the heap's free memory back (``cpu.release_free_memory``)
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

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
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
