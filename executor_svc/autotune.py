"""Which implementation of each op is fastest on this CPU, found by timing them once at start
on the model's real shapes, as oneDNN and Triton autotune; never by dtype alone.

For each op with more than one implementation here (``candidates``): each candidate's result
is checked against torch's (a candidate that computes wrong never wins), then each is called
a few times to warm up and timed, in rounds that alternate the candidates (a neighbour's load
falls on all of them alike), and the lowest time wins: each candidate's fastest call, since a
neighbour's load only ever adds time (a median taken on a busy machine keeps its noise).
The choices are kept in a JSON file
in pagedserve's cache, one per machine key (the processor and its extensions, torch's
version, the compiled kernels' source, the thread count) and within it one entry per op,
shape and dtype: the next start on the same machine times nothing. A timing taken while other
work held the cores this process needs (``CoreLoad``) serves its own start and is not kept.

``PAGEDSERVE_CPU_OPS`` forces choices instead: ``torch`` (or ``cpu``: every op that has one),
or per op, ``linear=onednn,greedy=torch``.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pagedserve.common.config import cache_dir
from pagedserve.common.log import get_logger
from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.cpu_features import CpuInfo, cpu_info

log = get_logger("executor")
OVERRIDE_ENV = "PAGEDSERVE_CPU_OPS"
TUNED_OPS = ("linear", "add_rms_norm", "silu_mul", "greedy", "attention")
WARMUP, ROUNDS = 2, 5
ROUND_BUDGET_S = 0.15  # fewer rounds (down to MIN_ROUNDS) where one round takes longer
MIN_ROUNDS = 3
# A timing is kept only if other work held at most this share of the core time this process's
# threads needed (a 2-thread neighbour on 2 cores holds about half).
MAX_STARVED = 0.25
# Part of the machine key: raised when earlier timings can no longer be trusted (2: timings
# taken under load were kept before CoreLoad; one such start timed our GEMM at 7x its usual;
# 3: attention was timed with its cache hot, and bf16 linears whose rows depend on the batch
# were candidates).
TIMING_VERSION = 3


@dataclass(frozen=True)
class Choice:
    """The implementation chosen for one op and shape, and each candidate's fastest call in
    seconds (empty where nothing was timed: a forced or a single choice)."""

    name: str
    seconds: dict[str, float]

    @property
    def best_s(self) -> float | None:
        """The chosen implementation's time, if it was timed."""
        return self.seconds.get(self.name)


class ChoiceCache:
    """The choices of one machine key in a JSON file; a file that does not parse is ignored
    (and replaced on the next choice)."""

    def __init__(self, path: Path, machine: dict[str, Any]):
        self.path = path
        self.machine = machine
        self.entries = self._read()

    def get(self, key: str) -> Choice | None:
        entry = self.entries.get(key)
        return None if entry is None else Choice(entry["name"], entry["seconds"])

    def put(self, key: str, choice: Choice) -> None:
        """Remember ``choice`` for ``key``, on disk at once (written beside and renamed:
        another executor never reads half a file)."""
        self.entries[key] = {"name": choice.name, "seconds": choice.seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False,
                                         suffix=".tmp") as f:
            json.dump({"machine": self.machine, "choices": self.entries}, f, indent=1)
        os.replace(f.name, self.path)

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            entries = data["choices"]
            if data["machine"] != self.machine or not all(
                    isinstance(e["name"], str) and isinstance(e["seconds"], dict)
                    for e in entries.values()):
                raise ValueError("entries of another shape")
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("autotune cache unreadable: timing again", path=str(self.path),
                        error=str(exc))
            return {}


def machine_key(cpu: CpuInfo | None = None, threads: int | None = None) -> dict[str, Any]:
    """Everything besides the op, shape and dtype that could change which is fastest."""
    csrc = Path(cpu_kernels.__file__).with_name("csrc")
    source = hashlib.sha256(cpu_kernels.describe().encode())  # the build that serves
    for file in sorted(csrc.glob("*")) if csrc.is_dir() else []:
        source.update(b"\0" + file.name.encode() + b"\0" + file.read_bytes())
    return {"cpu": (cpu or cpu_info()).describe(), "torch": torch.__version__,
            "kernels": source.hexdigest()[:16],
            "threads": threads or torch.get_num_threads(), "timing": TIMING_VERSION}


def parse_forced(text: str) -> tuple[str | None, dict[str, str]]:
    """``PAGEDSERVE_CPU_OPS``'s value as (the choice for every op, the choice per op):
    ``"torch"`` -> ("torch", {}); ``"linear=onednn,greedy=cpu"`` -> (None, {...})."""
    every, per_op = None, {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, name = item.partition("=")
        if not sep:
            every = item
        elif op.strip() not in TUNED_OPS:
            raise ValueError(f"{OVERRIDE_ENV}: unknown op {op.strip()!r} in {text!r}; "
                             f"ops: {', '.join(TUNED_OPS)}")
        else:
            per_op[op.strip()] = name.strip()
    return every, per_op


class Tuner:
    """Chooses among candidates by checking and timing them (``choose``), remembering each
    choice in ``cache``; ``forced`` (``parse_forced``'s pair) overrides the timing."""

    def __init__(self, cache: ChoiceCache | None,
                 forced: tuple[str | None, dict[str, str]] = (None, {}),
                 load: CoreLoad | None = None):
        self.cache = cache
        self.every, self.per_op = forced
        self.load = load or CoreLoad(torch.get_num_threads())

    @classmethod
    def for_machine(cls, cpu: CpuInfo | None = None) -> Tuner:
        """A tuner whose choices are cached for this machine (or ``cpu``) under
        pagedserve's cache dir, forced as ``PAGEDSERVE_CPU_OPS`` says."""
        machine = machine_key(cpu)
        name = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
        return cls(ChoiceCache(cache_dir() / "autotune" / f"{name}.json", machine),
                   parse_forced(os.environ.get(OVERRIDE_ENV, "")))

    def choose(self, op: str, key: str, candidates: dict[str, Callable[..., Any]],
               make_inputs: Callable[[], Sequence], reference: Callable[..., Any],
               tolerance: float, before: Callable[[], None] | None = None,
               admit: Callable[[tuple[str, ...]], list[str]] | None = None) -> Choice:
        """The fastest of ``candidates`` (name -> function of ``make_inputs()``) for ``op``
        at ``key`` (its shape and dtype) among those whose result agrees with
        ``reference``'s within ``tolerance`` (relative to the result's largest value) and,
        where ``admit`` is given, that it keeps of those names (a check that only a timing
        needs: a cached choice passed it); ``before`` (untimed) runs before each timed
        call."""
        forced = self._forced(op, candidates)
        if forced is not None:
            return Choice(forced, {})
        if len(candidates) == 1:
            return Choice(next(iter(candidates)), {})
        entry = f"{op} {key}"
        cached = self.cache.get(entry) if self.cache else None
        if cached is not None and cached.name in candidates:
            return cached
        correct = self._correct(entry, candidates, make_inputs, reference, tolerance)
        if admit is not None:
            kept = admit(tuple(correct))
            correct = {name: run for name, run in correct.items() if name in kept}
        self.load.sample()
        seconds = time_candidates(correct, make_inputs(), before)
        starved = self.load.starved()
        choice = Choice(min(seconds, key=seconds.get), seconds)
        log.info("autotuned", op=entry, choice=choice.name,
                 ms={name: round(s * 1e3, 3) for name, s in seconds.items()},
                 starved=None if starved is None else round(starved, 2))
        if starved is not None and starved > MAX_STARVED:
            log.warning("autotune timed under load: this start uses the choice, the next "
                        "times it again", op=entry, starved=round(starved, 2))
        elif self.cache:
            self.cache.put(entry, choice)
        return choice

    def _forced(self, op: str, candidates: dict[str, Callable]) -> str | None:
        name = self.per_op.get(op)
        if name is not None and name not in candidates:
            raise ValueError(f"{OVERRIDE_ENV} forces {op}={name}, which does not serve here; "
                             f"choose from {', '.join(candidates)}")
        if name is None and self.every in candidates:
            name = self.every
        return name

    @staticmethod
    def _correct(entry: str, candidates: dict[str, Callable], make_inputs: Callable,
                 reference: Callable, tolerance: float) -> dict[str, Callable]:
        want = reference(*make_inputs())
        correct = {}
        for name, run in candidates.items():
            error = deviation(run(*make_inputs()), want)
            if error <= tolerance:
                correct[name] = run
            else:
                log.warning("autotune candidate computes wrong: not chosen", op=entry,
                            candidate=name, relative_error=float(f"{error:.3g}"))
        if not correct:
            raise RuntimeError(f"no implementation of {entry} agrees with torch's "
                               f"({', '.join(candidates)} all differ)")
        return correct


def time_candidates(candidates: dict[str, Callable[..., Any]], inputs: Sequence,
                    before: Callable[[], None] | None = None) -> dict[str, float]:
    """Each candidate's fastest call on ``inputs``, in seconds: ``WARMUP`` calls each, then
    rounds of one call of each, ``ROUNDS`` of them or fewer where a round is slow;
    ``before`` (untimed) runs before each timed call."""
    for run in candidates.values():
        for _ in range(WARMUP):
            run(*inputs)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    rounds, done = ROUNDS, 0
    while done < rounds:
        for name, run in candidates.items():
            if before is not None:
                before()
            start = time.perf_counter()
            run(*inputs)
            times[name].append(time.perf_counter() - start)
        done += 1
        if done == 1:
            round_s = sum(t[0] for t in times.values())
            rounds = max(MIN_ROUNDS, min(ROUNDS, int(ROUND_BUDGET_S / max(round_s, 1e-9))))
    return {name: min(t) for name, t in times.items()}


class CoreLoad:
    """The share of the core time this process's ``threads`` needed that other work held
    (``starved``): other processes' time on this process's CPUs, the hypervisor's (steal)
    among it, from ``/proc/stat``'s per-CPU counters less this process's own CPU time, beyond
    what the CPUs our threads leave spare can absorb. Read over at least ``window_s`` up to
    now, from the newest ``sample`` that old: the counters tick every 10 ms, too coarse for
    one op's timing of a millisecond, so a short timing is judged by the load around it."""

    def __init__(self, threads: int, cpus: Sequence[int] | None = None,
                 stat: Path = Path("/proc/stat"), window_s: float = 0.25):
        self.cpus = set(cpus if cpus is not None else os.sched_getaffinity(0))
        self.threads = max(1, min(threads, len(self.cpus)))
        self.stat = stat
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=32)  # (wall, busy, own) seconds
        self.sample()

    def sample(self) -> None:
        """Remember the counters now (the tuner does before each timing)."""
        busy = self._busy_s()
        if busy is not None:
            self.samples.append((time.perf_counter(), busy, time.process_time()))

    def starved(self) -> float | None:
        """Since the newest sample at least ``window_s`` old (waiting for the oldest to be
        that old where none is); None where the counters cannot be read (not Linux)."""
        if not self.samples:
            return None
        now = time.perf_counter()
        old = [s for s in self.samples if now - s[0] >= self.window_s]
        start = old[-1] if old else self.samples[0]
        time.sleep(max(0.0, self.window_s - (now - start[0])))
        self.sample()
        if self.samples[-1] is start:  # the counters could not be read this time
            return None
        (wall0, busy0, own0), (wall, busy, own) = start, self.samples[-1]
        others = max(0.0, (busy - busy0) - (own - own0)) / (wall - wall0)  # in cores
        spare = len(self.cpus) - self.threads
        return min(1.0, max(0.0, others - spare) / self.threads)

    def _busy_s(self) -> float | None:
        """Seconds our CPUs have spent on anything but idling since boot."""
        try:
            lines = self.stat.read_text().splitlines()
        except OSError:
            return None
        ticks = 0
        for line in lines:  # "cpuN user nice system idle iowait irq softirq steal ..."
            name, *fields = line.split() or [""]
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                ticks += user + nice + system + irq + softirq + steal
        return ticks / os.sysconf("SC_CLK_TCK")


class ColdCaches:
    """Called, reads a buffer twice the size of the CPU's largest cache (as sysfs gives it;
    32 MiB where it does not), so that the next call finds nothing of its own operands
    cached. A decode step's linear layer reads its weight from memory (a step passes over
    every layer's weights, far more than the caches hold), while a call repeated for timing
    finds its weight cached: timed so, a kernel whose software prefetch hides the memory's
    latency looked no faster than one that waits on it (our GEMM against oneDNN's at 32
    rows, 0.281 against 0.283 ms hot, 1.34x from memory: BENCHMARKS.md, "Decode GEMM
    fetches ahead"). The buffer is allocated on the first call and freed with the object."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def __call__(self) -> None:
        if self.buffer is None:
            size = 2 * largest_cache_bytes() // 4
            self.buffer = torch.ones(size, dtype=torch.float32)
        self.buffer.sum()


def largest_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The size of this CPU's largest cache (sysfs: ``index*/size`` under ``caches``, such
    as "32768K"), or 32 MiB where it says nothing."""
    sizes = []
    for entry in caches.glob("index*/size"):
        text = entry.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=32 << 20)


def deviation(got: Any, want: Any) -> float:
    """The largest difference of ``got`` from ``want`` (tensors, or tuples of them),
    relative to ``want``'s largest magnitude; infinite where shapes or integer results
    (token ids) differ."""
    pairs = zip(got, want) if isinstance(want, tuple) else [(got, want)]
    worst = 0.0
    for g, w in pairs:
        if g.shape != w.shape:
            return float("inf")
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return float("inf")
            continue
        g, w = g.float(), w.float()
        scale = w.abs().max().item() or 1.0
        error = (g - w).abs().max().item() / scale if w.numel() else 0.0
        worst = max(worst, error if error == error else float("inf"))  # NaN: wrong
    return worst


def dtype_tolerance(dtype: torch.dtype) -> float:
    """How far a candidate may differ from torch in ``dtype``: float32 sums in another
    order, or one bfloat16 rounding."""
    return 1e-4 if dtype == torch.float32 else 2e-2
