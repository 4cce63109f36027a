"""The executor's bounds on what oneDNN and torch cache per GEMM shape: without them, every
batch size continuous batching brings keeps an entry, and the heap grows run after run."""
from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest
import torch

from pagedserve.executor_svc.layer_ops import can_pack

# Three passes of prepacked GEMMs, each at 120 row counts no pass before used; the heap's
# bytes in use after each pass, in MB.
PROBE = """
import ctypes, ctypes.util, sys
import torch
from pagedserve.executor_svc.cpu_memory import bound_primitive_cache
from pagedserve.executor_svc.layer_ops import OneDnnLinear
if sys.argv[1] == "bounded":
    bound_primitive_cache()
torch.set_num_threads(1)

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.mallopt(-3, 32 << 20)  # as the executor's allocator: no mmap below 32 MiB
torch.manual_seed(0)
layer = OneDnnLinear(torch.randn(256, 64), None)
for step in range(3):
    for rows in range(33 + step, 33 + 3 * 120, 3):
        layer(torch.randn(rows, 64))
    print(libc.mallinfo2().uordblks / 2**20)
"""


def heap_in_use(mode: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout
    return [float(line) for line in out.split()]


@pytest.mark.skipif(not can_pack(torch.float32), reason="no oneDNN in this torch build")
@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
                    reason="needs glibc's mallinfo2")
def test_new_batch_sizes_stop_growing_the_heap_once_the_caches_are_full():
    unbounded, bounded = heap_in_use("unbounded"), heap_in_use("bounded")
    print(f"heap in use after each pass, MB: unbounded {unbounded}, bounded {bounded}")
    assert unbounded[2] - unbounded[1] > 5  # the probe sees the growth it guards against
    assert bounded[2] - bounded[1] < 2
