"""The processor an executor runs on: its name and the vector and matrix extensions that decide
which kernels are fastest on it (AVX2, AVX-512, AVX512_BF16, AMX). Logged at start, sent to the
scheduler with the kernels chosen, and shown by ``pagedserve health``."""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# The extensions our kernels, torch's (oneDNN) and vLLM's CPU build choose between, widest last.
EXTENSIONS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
BF16_NATIVE = ("amx_bf16", "avx512_bf16")  # extensions that compute bfloat16 natively


@dataclass(frozen=True)
class CpuInfo:
    model: str                   # the processor's name as the OS reports it
    extensions: tuple[str, ...]  # those of EXTENSIONS it has, in EXTENSIONS' order

    def has(self, extension: str) -> bool:
        return extension in self.extensions

    def native_bf16(self) -> str | None:
        """The widest extension with which this CPU computes bfloat16 natively, if any."""
        return next((e for e in BF16_NATIVE if self.has(e)), None)

    def describe(self) -> str:
        """``"AMD EPYC: avx2 fma"``: the name and the extensions, one line."""
        return f"{self.model}: {' '.join(self.extensions) or 'none of ' + ', '.join(EXTENSIONS)}"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor of a Linux ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends: the others repeat it
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return CpuInfo(fields.get("model name") or platform.processor() or platform.machine(),
                   tuple(e for e in EXTENSIONS if e in flags))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's processor (without ``/proc/cpuinfo``: its name only, no extensions)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo(platform.processor() or platform.machine(), ())
