"""The compiled CPU decode kernel (``csrc/paged_decode_cpu.c``), loaded with ctypes.

Decode attention reads every sequence's whole context each step. Gathering those blocks into
a contiguous copy first (the torch path) moves the context through memory three times; the
kernel reads it once, in place. It is plain C with no torch headers: it builds in about a
second with the system's C compiler, once per machine and source, into pagedserve's cache
(``-march=native``, so the build is keyed by the CPU's flags too). Without a compiler, or for
other dtypes than float32, attention takes the torch path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from common.config import cache_dir
from common.log import get_logger

log = get_logger("executor")
SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built kernel library, building it on first use; None (and one warning) when it
    cannot be built here. ``PAGEDSERVE_CPU_KERNELS=0`` turns it off."""
    if os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: CPU decode attention takes the slower torch path")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_flags()])).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"paged_decode_cpu-{key}.so"
    if not library.exists():
        try:
            _build(compiler, library)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            log.warning("CPU decode kernel did not build: taking the torch path",
                        error=str(detail).strip()[-500:])
            return None
    lib = ctypes.CDLL(str(library))
    lib.paged_decode_f32.restype = ctypes.c_int
    lib.paged_decode_f32.argtypes = [_PTR] * 6 + [_I64] * 6 + [ctypes.c_float, _I64]
    return lib


def _build(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent executors never load a partial file.
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(partial, library)


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return os.uname().machine.encode()


def serves(query: Tensor, k_cache: Tensor) -> bool:
    """Whether the kernel can run this step: float32 on the CPU, and built."""
    return (query.device.type == "cpu" and query.dtype == k_cache.dtype == torch.float32
            and load() is not None)


def paged_decode(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                 seq_lens: Tensor, scale: float) -> Tensor:
    """Attention of one new token per sequence (``query``: ``[D, H, hd]``) over the first
    ``seq_lens[i]`` tokens its ``block_tables[i]`` (int64) names; ``[D, H, hd]``."""
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    query = query.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    out = torch.empty_like(query)
    status = load().paged_decode_f32(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        lens.data_ptr(), out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim,
        block_size, tables.shape[1], scale, torch.get_num_threads())
    if status:
        raise ValueError(f"the CPU decode kernel does not serve {num_heads} heads over "
                         f"{num_kv_heads} kv heads with blocks of {block_size}")
    return out
