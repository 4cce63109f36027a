"""``pagedserve bench compare``: its request sets, its ratio table, and a real run of two
systems on one request (vLLM is not installed in CI; its runner shares the transformers path
through ``peer_run.py``)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from pagedserve.benchmarks import compare
from pagedserve.benchmarks.cli import bench
from pagedserve.benchmarks.workload import fingerprint, make_requests
from pagedserve.executor_svc.cpu_features import CpuInfo

BENCH_KERNELS = compare.PEER_RUN.with_name("kernels.py")


def test_request_sets_are_the_shared_workloads_and_the_sweep():
    sets = compare.request_sets(["fixed", "mixed"], repeats=3, sweep=[1, 4], mixed_repeats_hf=1)
    assert list(sets) == ["fixed", "mixed", "sweep-1", "sweep-4"]
    fixed = make_requests("fixed")
    assert sets["fixed"]["requests"] == [{"prompt": r.prompt_token_ids, "output_len": 128}
                                         for r in fixed]
    assert fingerprint(fixed) == "be159fed4dfd6398"  # the peers' workload, request for request
    assert sets["mixed"]["repeats"] == 3 and sets["mixed"]["repeats_transformers"] == 1
    assert all(sets[f"sweep-{c}"]["repeats"] == 3 and sets[f"sweep-{c}"]["repeats_transformers"]
               == 1 for c in (1, 4))
    assert [len(sets[f"sweep-{c}"]["requests"]) for c in (1, 4)] == [1, 4]
    assert all(len(r["prompt"]) == 128 and r["output_len"] == 128
               for r in sets["sweep-4"]["requests"])


def test_table_gives_total_tokens_per_second_and_ratios_against_each_peer():
    sets = {"a": {"requests": [{"prompt": [1] * 100, "output_len": 100}]}}
    results = {"pagedserve": {"results": {"a": {"median_s": 1.0}}},
               "transformers": {"results": {"a": {"median_s": 4.0}}},
               "vllm": {"results": {"a": {"median_s": 2.0}}}}
    table = compare.format_table(sets, results)
    assert table.splitlines()[0] == ("| request set | requests | pagedserve tok/s | "
                                     "transformers tok/s | vllm tok/s | pagedserve / "
                                     "transformers | pagedserve / vllm |")
    assert table.splitlines()[2] == "| a | 1 | 200.0 | 50.0 | 100.0 | 4.00x | 2.00x |"


def test_rounds_pool_each_system_s_runs_and_the_table_gives_each_round_s_ratio():
    sets = {"a": {"requests": [{"prompt": [1] * 100, "output_len": 100}]}}

    def rounds(*seconds):
        return compare.pool_rounds([{"engine": "x", "results": {"a": {"runs_s": list(runs),
                                                                      "median_s": runs[0]}}}
                                    for runs in seconds])
    ours, peer = rounds([1.0], [2.0], [1.5]), rounds([2.0], [2.2], [3.0])
    assert ours["results"]["a"] == {"runs_s": [1.0, 2.0, 1.5], "median_s": 1.5,
                                    "round_medians_s": [1.0, 2.0, 1.5]}
    # pooled: 200/1.5 against 200/2.2; each round's: 2.00x, 1.10x, 2.00x
    row = compare.format_table(sets, {"pagedserve": ours, "vllm": peer}).splitlines()[2]
    assert row == "| a | 1 | 133.3 | 90.9 | 1.47x (1.10–2.00x) |"


def test_vllm_without_its_python_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--vllm-python"):
        compare.compare(["vllm"], [], 1, [1], None, "float32", 32, 1, tmp_path)


def test_pagedserve_and_transformers_side_by_side_on_one_request(smollm2_dir, tmp_path):
    run = compare.compare(["pagedserve", "transformers"], [], 1, [1], None, "float32", 32, 1,
                          tmp_path, model=str(smollm2_dir))
    for system in ("pagedserve", "transformers"):
        timing = run["results"][system]["results"]["sweep-1"]
        assert len(timing["runs_s"]) == 1 and timing["median_s"] > 0
    # pagedserve at its defaults: --dtype auto, bfloat16 or float32 by this CPU, with the reason
    executor = run["results"]["pagedserve"]["executor"]
    assert executor["dtype"] in ("float32", "bfloat16")
    assert executor["kernels"]["dtype"].startswith(f"{executor['dtype']} (auto: ")
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["cpu"] == run["cpu"] and saved["peer_dtype"] == "float32"
    assert saved["sets"]["sweep-1"] == {"requests": 1, "tokens": 256}
    assert "| sweep-1 | 1 |" in compare.format_table(run["sets"], run["results"])


def test_pagedserve_runs_with_the_flags_given_and_says_so(smollm2_dir, tmp_path):
    run = compare.compare(["pagedserve"], [], 1, [1], None, "float32", 32, 1, tmp_path,
                          model=str(smollm2_dir), pagedserve_args=("--dtype", "float32"))
    executor = run["results"]["pagedserve"]["executor"]
    assert executor["dtype"] == "float32" and executor["kernels"]["dtype"] == "float32 (--dtype)"
    assert json.loads((tmp_path / "compare.json").read_text())["pagedserve_args"] == [
        "--dtype", "float32"]
    assert compare.describe_run(run).splitlines()[1].startswith("pagedserve (--dtype float32): ")


def test_the_peer_runner_takes_its_own_folder_off_sys_path(tmp_path):
    """Run as a script, peer_run.py has benchmarks/ first on sys.path, and benchmarks/kernels.py
    would answer transformers' import of Hugging Face's `kernels` (5.25 on): it drops it."""
    runner = str(compare.PEER_RUN)
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(compare.PEER_RUN.parent)!r})  # as `python peer_run.py` does
        assert importlib.util.find_spec("kernels").origin == {str(BENCH_KERNELS)!r}
        exec(compile(open({runner!r}).read(), {runner!r}, "exec"),
             {{"__file__": {runner!r}, "__name__": "peer_run"}})
        spec = importlib.util.find_spec("kernels")
        assert spec is None or spec.origin != {str(BENCH_KERNELS)!r}, sys.path
        """)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_a_peer_that_dies_is_reported_and_the_others_results_are_kept(tmp_path):
    # a peer built for another CPU dies of SIGILL: one that does exactly that
    peer = tmp_path / "python"
    peer.write_text("#!/bin/sh\nkill -ILL $$\n")
    peer.chmod(0o755)
    run = compare.compare(["vllm"], [], 1, [1], str(peer), "float32", 32, 1, tmp_path)
    assert run["results"] == {}
    assert "SIGILL" in run["failed"]["vllm"] and "instruction" in run["failed"]["vllm"]
    assert json.loads((tmp_path / "compare.json").read_text())["failed"] == run["failed"]
    assert (tmp_path / "vllm.log").exists()
    again = compare.compare(["vllm"], [], 1, [1], str(peer), "float32", 32, 1, tmp_path / "r",
                            rounds=2)
    assert "SIGILL" in again["failed"]["vllm"] and again["results"] == {}
    assert sorted(p.name for p in (tmp_path / "r").glob("*.log")) == ["vllm-1.log"]  # no more
    cli = CliRunner().invoke(bench, ["compare", "--systems", "vllm", "--workloads", "",
                                     "--sweep", "1", "--vllm-python", str(peer), "--out",
                                     str(tmp_path / "cli")])
    assert cli.exit_code == 1 and "no results: vllm was killed by SIGILL" in cli.output


@pytest.mark.parametrize("extensions, dtype", [(("avx2", "fma"), "float32"),
                                               (("avx2", "fma", "avx512f", "avx512_bf16"),
                                                "bfloat16"),
                                               (("avx2", "fma", "amx_tile", "amx_bf16"),
                                                "bfloat16")])
def test_peers_run_at_their_fastest_dtype_for_the_cpu(extensions, dtype):
    cpu = CpuInfo("Some CPU", extensions)
    assert compare.peer_dtype("auto", cpu) == dtype
    assert compare.peer_dtype("float32", cpu) == "float32"
    with pytest.raises(ValueError, match="peer dtype 'int8'"):
        compare.peer_dtype("int8", cpu)


def test_the_run_names_the_cpu_and_each_system_s_kernels():
    run = {"cpu": "AMD EPYC: avx2 fma", "peer_dtype": "float32", "results": {
        "pagedserve": {"executor": {"kernels": {"linear": "cpu<=32, onednn>32 rows",
                                                "dtype": "float32 (auto: no amx_bf16 or "
                                                         "avx512_bf16)",
                                                "cpu": "AMD EPYC: avx2 fma"}}},
        "vllm": {"results": {}}}}
    assert compare.describe_run(run).splitlines() == [
        "cpu: AMD EPYC: avx2 fma",
        "pagedserve: linear cpu<=32, onednn>32 rows; dtype float32 (auto: no amx_bf16 or "
        "avx512_bf16)",
        "vllm: float32"]


def test_as_avx2_only_holds_every_system_to_avx2(tmp_path, monkeypatch):
    """pagedserve starts on the avx2 build in float32 and a peer's processes with oneDNN, MKL
    and ATen held to AVX2, where torch says the CPU has no AVX-512 (vLLM then loads its AVX2
    kernels); compare.json and the description say the run was held back."""
    if not compare.cpu_info().has("avx2"):
        pytest.skip("no AVX2 to hold to")
    started = []

    def fake_pagedserve(sets, ports, out, model, args, log_name, env):
        started.append((args, env))
        return {"results": {name: {"runs_s": [1.0], "median_s": 1.0} for name in sets}}
    monkeypatch.setattr(compare, "run_pagedserve", fake_pagedserve)
    peer = tmp_path / "python"  # records what it was given and what its torch says, then dies
    peer.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        env > {tmp_path}/env.txt
        {sys.executable} -c "import torch.cpu as c; print(c._is_avx512_supported(), \\
            c._is_avx512_bf16_supported(), c._is_amx_tile_supported(), c._is_avx2_supported())" \\
            > {tmp_path}/torch.txt
        exit 3
        """))
    peer.chmod(0o755)
    run = compare.compare(["pagedserve", "vllm"], [], 1, [1], str(peer), "auto", 32, 1,
                          tmp_path / "out", as_avx2_only=True)
    (args, env), = started
    assert args == ("--dtype", "float32") and env["PAGEDSERVE_CPU_ISA"] == "avx2"
    peer_env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines()
                    if "=" in line)
    for name, value in compare.AVX2_ONLY_ENV.items():
        assert env[name] == peer_env[name] == value
    assert peer_env["PYTHONPATH"].split(":")[0] == str(compare.AVX2_ONLY_SITE)
    assert (tmp_path / "torch.txt").read_text().split() == ["False", "False", "False", "True"]
    assert run["peer_dtype"] == "float32" and "status 3" in run["failed"]["vllm"]
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["as_avx2_only"] and saved["pagedserve_args"] == ["--dtype", "float32"]
    assert compare.describe_run(run).splitlines()[0].endswith(
        "(held to AVX2 code paths: --as-avx2-only)")
    kept = compare.compare(["pagedserve"], [], 1, [1], None, "bfloat16", 32, 1, tmp_path / "b",
                           pagedserve_args=("--dtype", "bfloat16"), as_avx2_only=True)
    assert started[-1][0] == ("--dtype", "bfloat16") and kept["peer_dtype"] == "bfloat16"
