"""The compiled CPU kernels' builds, one per instruction set, and the choice among them.

The sources (``csrc/*.c``) are plain C with no torch headers, written with GCC's vector
extensions: the same code is compiled once per instruction set below, each build with that
set's flags only (never ``-march=native``, which would key a build to the machine that made it
and silently use whatever that machine had). At start the executor loads the widest build its
CPU runs (``cpu_features.cpu_info``), building it on first use in about a second with the
system's C compiler, into pagedserve's cache, or a per-user temporary folder where the cache
is read-only; ``python -m pagedserve.executor_svc.cpu_build DIR`` builds every one ahead of
time (an image build does, and sets ``PAGEDSERVE_KERNELS_DIR=DIR``).

``PAGEDSERVE_CPU_ISA=NAME`` forces a build (one this CPU cannot run is an error, never a crash);
``PAGEDSERVE_CPU_KERNELS=0`` turns the kernels off (the torch path). Where no build can be
made, ``load()`` says why, and ``pagedserve health`` shows it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pagedserve.common.config import cache_dir
from pagedserve.common.log import get_logger
from pagedserve.executor_svc.cpu_features import CpuInfo, cpu_info

log = get_logger("executor")
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.[ch]"))
COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-Wno-psabi")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")


@dataclass(frozen=True)
class Isa:
    """One build of the kernels: the instruction set it is compiled for."""

    name: str
    flags: tuple[str, ...]  # the compiler flags that enable it
    needs: tuple[str, ...]  # the CPU extensions (cpu_features names) it runs on
    vectors: str            # what the sources become under it, for the log

    def runs_on(self, cpu: CpuInfo) -> bool:
        return all(cpu.has(extension) for extension in self.needs)


# Widest first: the first one the CPU runs is chosen. Attention and the layer ops use 8-float
# vectors in every build (under AVX-512 with its 32 registers), but for a bf16 model's
# attention and GEMM under AVX512_BF16 (512-bit bf16 dot products); the GEMM widens to 16,
# and runs a bf16 model's projections on AMX tiles where the CPU has them (csrc/gemm_amx.c).
ISAS = (
    Isa("amx", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
                "-mamx-tile", "-mamx-bf16"), _AVX512 + ("avx512_bf16", "amx_tile", "amx_bf16"),
        "AVX-512 and AVX512_BF16 as avx512_bf16; a bf16 model's GEMM and attention on "
        "AMX tiles"),
    Isa("avx512_bf16", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                        "-mfma"), _AVX512 + ("avx512_bf16",),
        "AVX-512; bf16 dot products in bf16 attention and GEMM; GEMM 16-float vectors"),
    Isa("avx512", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"), _AVX512,
        "AVX-512; GEMM 16-float vectors"),
    Isa("avx2", ("-mavx2", "-mfma"), ("avx2", "fma"), "AVX2 + FMA; 8-float vectors"),
    Isa("generic", (), (), "the compiler's baseline for this architecture"),
)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")


@dataclass(frozen=True)
class Library:
    """A loaded build."""

    isa: Isa
    cdll: ctypes.CDLL
    path: Path

    def describe(self) -> str:
        return f"{self.isa.name} build ({self.isa.vectors})"


def candidates(cpu: CpuInfo) -> list[Isa]:
    """The builds this CPU runs, widest first (off x86, the baseline build only)."""
    return [isa for isa in ISAS if isa.runs_on(cpu) and (_X86 or not isa.flags)]


def choose(cpu: CpuInfo, forced: str | None = None) -> list[Isa]:
    """The builds to try, in order: the forced one alone, else every one the CPU runs.
    A forced build the CPU cannot run, or that does not exist, is a ``ValueError``."""
    if not forced:
        return candidates(cpu)
    names = {isa.name: isa for isa in ISAS}
    if forced not in names:
        raise ValueError(f"PAGEDSERVE_CPU_ISA={forced!r}: expected one of {', '.join(names)}")
    if names[forced] not in candidates(cpu):
        raise ValueError(f"PAGEDSERVE_CPU_ISA={forced}: this CPU ({cpu.describe()}) cannot run "
                         f"it; it runs {', '.join(i.name for i in candidates(cpu))}")
    return [names[forced]]


def build(isa: Isa, folder: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """The library of ``isa`` in ``folder``, compiled there unless it is already; its name is
    keyed by the sources and the flags, so a changed source builds anew (and a build made
    ahead of time is found where no compiler is). ``OSError`` or ``CalledProcessError`` (with
    the compiler's message) when it cannot."""
    flags = COMMON_FLAGS + isa.flags + extra_flags
    key = hashlib.sha256(b"\0".join([*(s.read_bytes() for s in SOURCES), " ".join(flags).encode()]))
    library = folder / f"cpu_kernels-{isa.name}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    compiler = _compiler()
    folder.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent executors never load a partial file.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        partial = Path(tmp) / library.name
        sources = [str(s) for s in SOURCES if s.suffix == ".c"]
        subprocess.run([compiler, *flags, "-o", str(partial), *sources, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(partial, library)
    return library


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    return compiler


def _folders() -> list[Path]:
    """Where builds are looked for, and made in the first writable one: an ahead-of-time
    folder, pagedserve's cache, then a per-user temporary folder."""
    prebuilt = os.environ.get("PAGEDSERVE_KERNELS_DIR")
    folders = [Path(prebuilt)] if prebuilt else []
    return folders + [cache_dir() / "kernels",
                      Path(tempfile.gettempdir()) / f"pagedserve-kernels-{os.getuid()}"]


def _find_or_build(isa: Isa) -> Path:
    errors = []
    for folder in _folders():
        try:
            return build(isa, folder)
        except subprocess.CalledProcessError as exc:
            raise OSError(f"{exc.cmd[0]} failed: {exc.stderr.strip()[-400:]}") from exc
        except OSError as exc:  # read-only or missing folder, or no compiler: try the next
            errors.append(f"{folder}: {exc}")
    raise OSError("; ".join(errors))


@dataclass(frozen=True)
class Loaded:
    """What ``load`` found: the library, or None and why."""

    library: Library | None
    status: str  # "avx2 build (...)", or why none serves


@functools.cache
def load() -> Loaded:
    """The widest build this CPU runs, loaded (built first where needed); no library when the
    kernels are off or no build could be made, and the reason, logged."""
    if os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0":
        return Loaded(None, "off (PAGEDSERVE_CPU_KERNELS=0)")
    cpu = cpu_info()
    failures = []
    for isa in choose(cpu, os.environ.get("PAGEDSERVE_CPU_ISA")):
        try:
            path = _find_or_build(isa)
            library = Library(isa, ctypes.CDLL(str(path)), path)
        except OSError as exc:
            failures.append(f"{isa.name}: {exc}")
            log.warning("CPU kernels: a build failed", isa=isa.name, error=str(exc)[-500:])
            continue
        log.info("CPU kernels", build=library.describe(), cpu=cpu.describe(), path=str(path))
        return Loaded(library, library.describe())
    status = "not built: " + " | ".join(failures)[-500:]
    log.warning("CPU kernels did not build: taking the torch path", error=status)
    return Loaded(None, status)


def main(argv: list[str]) -> int:
    """``python -m pagedserve.executor_svc.cpu_build DIR``: build every instruction set's
    library into DIR (for an image: the CPU that will run it is not known yet)."""
    if len(argv) != 1:
        print("usage: python -m pagedserve.executor_svc.cpu_build DIR", file=sys.stderr)
        return 2
    for isa in ISAS:
        if isa.flags and not _X86:
            continue
        print(build(isa, Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
