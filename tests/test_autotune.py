"""Each op is the fastest correct implementation measured on this machine, chosen once, cached
per machine key, and forced by PAGEDSERVE_CPU_OPS; --dtype auto follows the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pagedserve.common.config import cache_dir
from pagedserve.executor_svc import autotune, cpu_kernels
from pagedserve.executor_svc.autotune import ChoiceCache, Tuner, parse_forced
from pagedserve.executor_svc.backends import chosen, sampler_ops
from pagedserve.executor_svc.backends import tuned as tuned_module
from pagedserve.executor_svc.backends.torch import TorchBackend
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.cpu_features import CpuInfo
from pagedserve.executor_svc.layer_ops import BucketedLinear, TorchLinear
from pagedserve.executor_svc.model import load_model
from pagedserve.executor_svc.model_config import ModelConfig
from pagedserve.executor_svc.model_runner import ModelRunner
from pagedserve.executor_svc.worker import resolve_dtype
from tiny_models import make_tiny_model

MACHINE = {"cpu": "Test CPU: avx2 fma", "torch": "2.x", "kernels": "abc", "threads": 2}
X = torch.arange(12.0).view(3, 4)


def _sleepy(seconds: float, result=None):
    def run(x):
        time.sleep(seconds)
        return x * 2 if result is None else result
    return run


def _choose(tuner, candidates, op="linear", key="4x4 float32"):
    return tuner.choose(op, key, candidates, lambda: (X.clone(),), lambda x: x * 2, 1e-4)


class _Load:
    """A CoreLoad stand-in that reports a fixed load: the real one reads this machine's."""

    def __init__(self, starved: float | None = 0.0):
        self.value = starved

    def sample(self):
        pass

    def starved(self):
        return self.value


def _tuner(tmp_path, machine=MACHINE, forced="", starved=0.0):
    return Tuner(ChoiceCache(tmp_path / "choices.json", machine), parse_forced(forced),
                 load=_Load(starved))


def test_the_fastest_correct_candidate_wins(tmp_path):
    choice = _choose(_tuner(tmp_path), {"slow": _sleepy(0.004), "fast": _sleepy(0.0005),
                                        "slower": _sleepy(0.008)})
    assert choice.name == "fast"
    assert choice.seconds["fast"] < choice.seconds["slow"] < choice.seconds["slower"]


def test_a_candidate_that_computes_wrong_never_wins(tmp_path):
    wrong = _sleepy(0, result=X * 2 + 1e-2)  # fastest, but off by more than the tolerance
    choice = _choose(_tuner(tmp_path), {"wrong": wrong, "right": _sleepy(0.002)})
    assert choice.name == "right" and "wrong" not in choice.seconds
    with pytest.raises(RuntimeError, match="no implementation of linear 4x4 float32 agrees"):
        _choose(_tuner(tmp_path / "other"), {"wrong": wrong, "nan": _sleepy(0, X * torch.nan)})


def test_a_cached_choice_is_not_timed_again_and_a_changed_key_is(tmp_path):
    _choose(_tuner(tmp_path), {"a": _sleepy(0.003), "b": _sleepy(0)})
    saved = json.loads((tmp_path / "choices.json").read_text())
    assert saved["machine"] == MACHINE and saved["choices"]["linear 4x4 float32"]["name"] == "b"

    def never(x):
        raise AssertionError("a cached choice ran its candidates")
    assert _choose(_tuner(tmp_path), {"a": never, "b": never}).name == "b"  # a hit
    # another shape, or another machine (its own file in use, read here as the same path)
    assert _choose(_tuner(tmp_path), {"a": _sleepy(0), "b": _sleepy(0.003)},
                   key="8x4 float32").name == "a"
    other = _tuner(tmp_path, MACHINE | {"threads": 4})
    assert other.cache.entries == {}


def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path):
    (tmp_path / "choices.json").write_text("{not json")
    assert _choose(_tuner(tmp_path), {"a": _sleepy(0.003), "b": _sleepy(0)}).name == "b"
    assert json.loads((tmp_path / "choices.json").read_text())["choices"]


def test_a_timing_under_load_serves_its_start_and_is_not_kept(tmp_path):
    loaded = _choose(_tuner(tmp_path, starved=0.6), {"a": _sleepy(0.003), "b": _sleepy(0)})
    assert loaded.name == "b" and loaded.seconds
    assert not (tmp_path / "choices.json").exists()
    ran = []
    quiet = _choose(_tuner(tmp_path), {"a": lambda x: ran.append("a") or x * 2,
                                       "b": lambda x: ran.append("b") or x * 2})
    assert ran and quiet.seconds  # timed again, and kept this time
    assert json.loads((tmp_path / "choices.json").read_text())["choices"]
    # where the counters cannot be read, a timing is kept as before
    _choose(_tuner(tmp_path / "unread", starved=None), {"a": _sleepy(0), "b": _sleepy(0)})
    assert (tmp_path / "unread" / "choices.json").exists()


def _spinners(cpus: list[int]) -> list[subprocess.Popen]:
    """One busy process pinned to each of ``cpus``, until killed."""
    code = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    return [subprocess.Popen([sys.executable, "-c", code, str(cpu)]) for cpu in cpus]


def test_the_core_load_sees_other_processes_on_the_cores_our_threads_need():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    procs = _spinners(cpus)
    try:
        time.sleep(0.3)  # the spinners start
        load = autotune.CoreLoad(threads=len(cpus), cpus=cpus)
        time.sleep(0.5)
        assert load.starved() > 0.75
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _stat(path: Path, busy_ticks: dict[int, int]) -> None:
    """A /proc/stat whose CPUs have spent ``busy_ticks`` in user time (the rest idle)."""
    rows = [f"cpu{n} {ticks} 0 0 100000 0 0 0 0 0 0" for n, ticks in busy_ticks.items()]
    path.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n" + "\n".join(rows) + "\nintr 1 2\n")


@pytest.mark.parametrize("threads, starved", [(2, 0.5), (1, 0.0)])
def test_the_core_load_counts_only_what_the_spare_cpus_cannot_absorb(tmp_path, threads,
                                                                     starved):
    """Other work held one of two CPUs all along: half of what two threads need, nothing of
    what one thread needs."""
    stat, hz = tmp_path / "stat", os.sysconf("SC_CLK_TCK")
    _stat(stat, {0: 1000, 1: 1000})
    load = autotune.CoreLoad(threads=threads, cpus=[0, 1], stat=stat, window_s=0.3)
    start = time.perf_counter()
    time.sleep(0.3)
    _stat(stat, {0: 1000, 1: 1000 + round((time.perf_counter() - start) * hz)})
    assert load.starved() == pytest.approx(starved, abs=0.1)


def test_a_short_timing_is_judged_over_the_window_before_it(tmp_path):
    """The counters tick every 10 ms: a timing of a millisecond is judged from the newest
    sample at least a window old, or after waiting out the window where none is."""
    stat, hz = tmp_path / "stat", os.sysconf("SC_CLK_TCK")
    _stat(stat, {0: 0})
    load = autotune.CoreLoad(threads=1, cpus=[0], stat=stat, window_s=0.2)
    start = time.perf_counter()
    assert load.starved() == pytest.approx(0.0, abs=0.05)  # nothing old enough: it waited
    assert time.perf_counter() - start >= 0.2
    _stat(stat, {0: round(0.2 * hz)})  # a neighbour held the CPU for 0.2 s ...
    time.sleep(0.2)
    load.sample()  # ... and then a timing starts: short, its own span holds no tick
    assert load.starved() > 0.5  # about 1, less what the sleep overran


def test_the_core_load_reports_nothing_where_the_counters_cannot_be_read(tmp_path):
    load = autotune.CoreLoad(threads=1, stat=tmp_path / "absent")
    load.sample()
    assert load.starved() is None


def test_the_cache_file_is_keyed_by_the_machine():
    avx2 = Tuner.for_machine(CpuInfo("A", ("avx2", "fma")))
    amx = Tuner.for_machine(CpuInfo("A", ("avx2", "fma", "amx_bf16")))
    assert avx2.cache.path.parent == cache_dir() / "autotune"
    assert avx2.cache.path != amx.cache.path
    assert avx2.cache.machine["torch"] == torch.__version__


def test_forced_choices_override_the_timing(tmp_path):
    fast_wrong = {"cpu": _sleepy(0.003), "torch": _sleepy(0)}
    assert _choose(_tuner(tmp_path, forced="cpu"), fast_wrong).name == "cpu"
    assert _choose(_tuner(tmp_path, forced="torch,linear=cpu"), fast_wrong).name == "cpu"
    assert _choose(_tuner(tmp_path, forced="greedy=cpu"), fast_wrong).name == "torch"
    with pytest.raises(ValueError, match="forces linear=onednn, which does not serve here"):
        _choose(_tuner(tmp_path, forced="linear=onednn"), fast_wrong)
    with pytest.raises(ValueError, match="unknown op 'gemm'"):
        parse_forced("gemm=cpu")


def test_a_function_run_before_each_timed_call_is_not_timed():
    """The decode bucket's linear is timed after a pass that evicts the caches: that pass
    runs before each timed call and its time is no candidate's."""
    ran = []
    seconds = autotune.time_candidates(
        {"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}, (),
        before=lambda: (ran.append("before"), time.sleep(0.02)))
    timed = ran[2 * autotune.WARMUP:]  # the warm-up calls come first, with nothing before
    assert ran[:2 * autotune.WARMUP].count("before") == 0
    assert timed == ["before", "a", "before", "b"] * (len(timed) // 4) and timed
    assert max(seconds.values()) < 0.01


def test_the_largest_cache_is_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert autotune.largest_cache_bytes(tmp_path) == 32 << 20
    assert autotune.largest_cache_bytes(tmp_path / "absent") == 32 << 20
    (tmp_path / "index4").mkdir()
    (tmp_path / "index4" / "size").write_text("96M\n")
    assert autotune.largest_cache_bytes(tmp_path) == 96 << 20


def test_the_decode_buckets_are_timed_with_cold_caches(tmp_path, monkeypatch):
    """Each linear's decode buckets (and only they) are timed with the weight read from
    memory, as a decode step reads it; each bucket's key names its rows."""
    if len(tuned_module.linear_candidates(torch.float32)) < 2:
        pytest.skip("one linear implementation serves float32 here")
    befores = []
    choose = Tuner.choose

    def spy(self, op, key, *args, **kwargs):
        befores.append((key, kwargs.get("before") or (args[4] if len(args) > 4 else None)))
        return choose(self, op, key, *args, **kwargs)
    monkeypatch.setattr(Tuner, "choose", spy)
    tuned_module.LinearTuning(_tuner(tmp_path), torch.float32).pack(torch.randn(64, 32), None)
    assert [(key.split()[-1], type(before).__name__) for key, before in befores] == [
        ("rows<=32", "ColdCaches"), ("rows<=128", "ColdCaches"), ("rows>128", "NoneType")]


def test_a_linear_layer_dispatches_by_its_rows():
    weight = torch.randn(6, 4)
    small, big = TorchLinear(weight, None), TorchLinear(weight * 2, None)
    layer = BucketedLinear([(32, small), (None, big)])
    assert layer.name == "torch<=32, torch>32 rows"
    x = torch.randn(33, 4)
    assert torch.equal(layer(x[:32]), small(x[:32])) and torch.equal(layer(x), big(x))


def test_one_implementation_is_the_least_time_per_output_value_over_every_bucket():
    # 32 rows x 100 columns, then 256 rows x 100: "a" wins the first bucket, "b" the second
    # and the sum (1/3200 + 8/25600 against 1.1/3200 + 6/25600)
    timed = [({"a": 1.0, "b": 1.1, "c": 0.5}, 3200), ({"a": 8.0, "b": 6.0}, 25600)]
    assert tuned_module.one_for_every_bucket(timed) == "b"  # "c" was not timed in both
    with pytest.raises(ValueError, match="every bucket"):
        tuned_module.one_for_every_bucket([({"a": 1.0}, 1), ({"b": 1.0}, 1)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_low_precision_linear_has_one_implementation_for_every_row_count(tmp_path, dtype):
    """Where the buckets' fastest differ: bucketed in float32; in bfloat16 one implementation,
    so that a token's hidden states do not depend on the step that computes it."""
    names = tuned_module.linear_candidates(dtype)
    if len(names) < 2:
        pytest.skip(f"one linear implementation serves {dtype} here")
    weight = torch.randn(64, 32).to(dtype)
    tuning = tuned_module.LinearTuning(_tuner(tmp_path), dtype)
    key = tuning.shape_key(weight, None)
    first, second = names[:2]  # the first wins the decode buckets, the second the other
    tuning.tuner.cache.put(f"linear {key} rows<=32", autotune.Choice(
        first, {first: 1.0, second: 1.2}))
    tuning.tuner.cache.put(f"linear {key} rows<=128", autotune.Choice(
        first, {first: 2.0, second: 2.1}))
    tuning.tuner.cache.put(f"linear {key} rows>128", autotune.Choice(
        second, {first: 12.0, second: 8.0}))
    layer = tuning.pack(weight, None)
    if dtype == torch.float32:
        assert isinstance(layer, BucketedLinear) and layer.name == (
            f"{first}<=32, {first}<=128, {second}>128 rows")
        assert [layer.serving(rows).name for rows in (32, 128, 129)] == [first, first, second]
    else:  # per output value: 1.2/2048 + 2.1/4096 + 8/16384 < 1/2048 + 2/4096 + 12/16384
        assert not isinstance(layer, BucketedLinear) and layer.name == second


class _RowsAlone(TorchLinear):
    """Each row's sums in float64, rounded: the same whatever rows share the call."""

    name = "torch"

    def matmul(self, x):
        return (x.double() @ self.weight.double().T).to(x.dtype)


class _RowsDependOnTheBatch(_RowsAlone):
    """The same, with a last-bit change that depends on how many rows share the call."""

    name = "onednn"

    def matmul(self, x):
        return super().matmul(x) * (1 + 2 ** -7 * (x.shape[0] % 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_low_precision_linear_whose_rows_depend_on_the_batch_is_left_out(tmp_path, dtype,
                                                                         monkeypatch):
    """However fast: in bf16 a token's output must not depend on the rows beside it (the
    preemption e2e tests' greedy outputs drifted so). In float32 it stays a candidate."""
    monkeypatch.setattr(tuned_module, "LINEARS", tuned_module.LINEARS | {
        "onednn": _RowsDependOnTheBatch, "torch": _RowsAlone})
    monkeypatch.setattr(tuned_module, "linear_candidates", lambda dtype: ["torch", "onednn"])
    monkeypatch.setattr(autotune, "time_candidates", lambda candidates, *_: {
        name: {"torch": 2.0, "onednn": 1.0}[name] for name in candidates})  # onednn faster
    tuning = tuned_module.LinearTuning(_tuner(tmp_path), dtype)
    weight = torch.randn(64, 32).to(dtype)
    assert tuning.pack(weight, None).name == ("onednn" if dtype == torch.float32 else "torch")
    assert not tuned_module.batch_invariant(_RowsDependOnTheBatch(weight, None).matmul, 32, dtype)
    assert tuned_module.batch_invariant(_RowsAlone(weight, None).matmul, 32, dtype)


def test_the_batch_probe_runs_only_where_a_linear_is_timed(tmp_path, monkeypatch):
    """A cached choice passed the probe when it was timed: a start that reads it probes
    nothing (the probe packs every candidate and multiplies hundreds of rows per shape)."""
    probed = []
    monkeypatch.setattr(tuned_module, "batch_invariant",
                        lambda matmul, *_: probed.append(matmul) or True)
    monkeypatch.setattr(tuned_module, "LINEARS", tuned_module.LINEARS | {
        "onednn": _RowsAlone, "torch": _RowsAlone})
    monkeypatch.setattr(tuned_module, "linear_candidates", lambda dtype: ["torch", "onednn"])
    weight = torch.randn(64, 32).to(torch.bfloat16)
    tuned_module.LinearTuning(_tuner(tmp_path), torch.bfloat16).pack(weight, None)
    assert len(probed) == 2  # once per candidate for the shape, though two buckets were timed
    tuned_module.LinearTuning(_tuner(tmp_path), torch.bfloat16).pack(weight, None)
    assert len(probed) == 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("llama_tied", tmp_path_factory.mktemp("tuned"))


def test_a_tuned_model_computes_what_the_untuned_one_does(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "WARMUP", 1)  # the choice matters less here than the time
    monkeypatch.setattr(autotune, "ROUNDS", 1)
    monkeypatch.setattr(autotune, "MIN_ROUNDS", 1)
    tuner = _tuner(tmp_path)
    tuned = load_model(model_dir, torch.float32, "cpu", tuner=tuner)
    untuned = load_model(model_dir, torch.float32, "cpu")
    got, want = _greedy_steps(tuned), _greedy_steps(untuned)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, logits_got), (_, logits_want) in zip(got, want):
        torch.testing.assert_close(logits_got, logits_want, rtol=1e-4, atol=1e-4)
    assert {entry.split()[0] for entry in tuner.cache.entries} == {
        "linear", "add_rms_norm", "silu_mul", "greedy"}
    kernels = chosen(tuned, _attention(), sampler_ops(tuned), "float32 (--dtype)")
    assert kernels["dtype"] == "float32 (--dtype)" and kernels["linear"]


def _greedy_steps(model, steps: int = 3) -> list[tuple[list[int], torch.Tensor]]:
    """Two prompts (40 rows: the prefill bucket), then decode steps, greedy; each step's
    tokens and logits."""
    cache = CacheEngine(model.config, 4, 64, 0, torch.float32, "cpu")
    attention = _attention(cache.null_block)
    sampler = sampler_ops(model)
    tables, computed, tokens = [list(range(0, 12)), list(range(12, 24))], [0, 0], [
        list(range(3, 33)), list(range(100, 110))]
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            lens = [len(t) - c for t, c in zip(tokens, computed)]
            meta = attention.build(tables, computed, lens)
            ids = torch.tensor([i for t, c in zip(tokens, computed) for i in t[c:]])
            hidden = model(ids, meta.positions, meta, cache.kv_caches)
            logits = model.compute_logits(hidden[meta.last_token_indices])
            next_ids = sampler.greedy(logits)[0].tolist()
            out.append((next_ids, logits))
            computed = [len(t) for t in tokens]
            tokens = [t + [i] for t, i in zip(tokens, next_ids)]
    return out


def test_forcing_torch_binds_torch_everywhere(model_dir, tmp_path):
    model = load_model(model_dir, torch.float32, "cpu", tuner=_tuner(tmp_path, forced="torch"))
    assert set(model.ops.names().values()) == {"torch"}
    kernels = chosen(model, _attention(), sampler_ops(model))
    assert kernels["linear"] == "torch" and kernels["cpu_kernels"] == cpu_kernels.describe()


def test_attention_is_timed_with_cold_caches(model_dir, tmp_path, monkeypatch):
    """A decode step reads every layer's context from memory; timed hot, torch's gathered
    decode tied ours on an AMX Xeon and was bound, ten times slower in real steps."""
    befores = []
    monkeypatch.setattr(Tuner, "choose", lambda self, op, key, *args: befores.append(
        type(args[-1]).__name__) or autotune.Choice("torch", {}))
    tuned_module.choose_attention(_tuner(tmp_path), ModelConfig.from_model_dir(model_dir), 4,
                                  torch.float32, torch.float32)
    assert befores == ["ColdCaches"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_the_faster_of_the_kernels_and_torch_and_stays_chosen(model_dir, tmp_path,
                                                                          monkeypatch, dtype):
    monkeypatch.setattr(autotune, "ROUNDS", 1)
    monkeypatch.setattr(autotune, "MIN_ROUNDS", 1)
    config = ModelConfig.from_model_dir(model_dir)
    tuner = _tuner(tmp_path)
    name = tuned_module.choose_attention(tuner, config, 4, dtype, dtype)
    [(entry, choice)] = tuner.cache.entries.items()
    assert entry.startswith("attention ") and choice["name"] == name
    assert set(choice["seconds"]) == ({"cpu", "torch"} if cpu_kernels.serves(dtype, dtype, "cpu")
                                      else set())
    assert min(choice["seconds"], key=choice["seconds"].get, default=name) == name
    cache = CacheEngine(config, 4, 16, 0, dtype, "cpu")
    runner = ModelRunner(load_model(model_dir, dtype, "cpu"), cache, 4, tuner=tuner)
    assert runner.attention.name == name  # the cached choice, bound
    forced = ModelRunner(runner.model, cache, 4, tuner=_tuner(tmp_path / "f", forced="torch"))
    assert forced.attention.name == "torch"


def _attention(null_block: int | None = None):
    return TorchBackend(4, "cpu", null_block)


AVX2 = CpuInfo("Zen 3", ("avx2", "fma"))
ZEN4 = CpuInfo("Zen 4", ("avx2", "fma", "avx512f", "avx512_bf16"))
XEON = CpuInfo("Xeon", ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))


@pytest.mark.parametrize("cpu, dtype, reason", [
    (AVX2, torch.float32, "float32 (auto: no amx_bf16 or avx512_bf16)"),
    (ZEN4, torch.bfloat16, "bfloat16 (auto: avx512_bf16)"),
    (XEON, torch.bfloat16, "bfloat16 (auto: amx_bf16)")])
def test_auto_dtype_on_a_cpu_is_bfloat16_where_it_computes_it_natively(model_dir, cpu, dtype,
                                                                       reason):
    config = ModelConfig.from_model_dir(model_dir)
    assert tuple(resolve_dtype("auto", config, torch.device("cpu"), cpu)) == (dtype, reason)
    assert resolve_dtype("float32", config, torch.device("cpu"), XEON).dtype == torch.float32


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_auto_dtype_takes_float32_where_bfloat16_measures_slower(model_dir, tmp_path,
                                                                 monkeypatch, faster):
    def proxy_time(tuner, config, dtype):
        delay = 0 if str(dtype).endswith(faster) else 0.004
        return lambda *xs: (time.sleep(delay), tuple(x.float() for x in xs))[1]
    monkeypatch.setattr(tuned_module, "_LayerProxy", _FakeProxy(proxy_time))
    config = ModelConfig.from_model_dir(model_dir)
    choice = resolve_dtype("auto", config, torch.device("cpu"), XEON, _tuner(tmp_path))
    assert choice.dtype == getattr(torch, faster)
    assert choice.reason == ("bfloat16 (auto: amx_bf16)" if faster == "bfloat16" else
                             "float32 (auto: amx_bf16, but bfloat16 measured slower here)")


class _FakeProxy:
    """Stands in for ``tuned._LayerProxy``: the identity, at a chosen speed per dtype."""

    def __init__(self, make):
        self.make = make

    def __call__(self, tuner, config, dtype):
        return self.make(tuner, config, dtype)

    def reference(self, config):
        run = self.make(None, config, torch.float32)
        run.inputs = lambda: [torch.ones(2, 3)]
        return run


def test_the_kernels_build_and_source_are_part_of_the_machine_key(monkeypatch):
    before = autotune.machine_key(AVX2)["kernels"]
    monkeypatch.setattr(cpu_kernels, "describe", lambda: "another build")
    assert autotune.machine_key(AVX2)["kernels"] != before
