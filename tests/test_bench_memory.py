"""``pagedserve bench memory``: block accounting on traces through the real block manager."""
import importlib.util
import json
import sys

import pytest
from click.testing import CliRunner

from pagedserve.benchmarks import memory as mem
from pagedserve.benchmarks.cli import bench
from pagedserve.benchmarks.memory import TraceRequest

SMALL = mem.MemoryBench(num_requests=120, num_blocks=256, max_model_len=1024)


def test_static_reservation_holds_its_chunk_until_the_request_finishes():
    # prompt 2 + output 3: Oracle reserves 5 slots; the second request waits for the first.
    trace = [TraceRequest([7, 7], [3]), TraceRequest([7, 7], [3])]
    oracle = mem.static_reservations(2048)["Oracle"]
    assert mem.run_static(trace, 5, oracle) == [(5, 2), (5, 3), (5, 4)] * 2
    assert mem.run_static(trace, 10, oracle) == [(10, 4), (10, 6), (10, 8)]


def test_static_policies_reserve_max_len_next_power_of_two_or_exact_length():
    reserve = mem.static_reservations(2048)
    assert [reserve["Max"](n) for n in (1, 5, 2048)] == [2048, 2048, 2048]
    assert [reserve["Pow2"](n) for n in (1, 5, 8, 9, 2048)] == [1, 8, 8, 16, 2048]
    assert [reserve["Oracle"](n) for n in (1, 5, 2048)] == [1, 5, 2048]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_utilisation_beats_oracle_beats_pow2_beats_max(seed):
    trace = mem.make_trace(mem.SHAREGPT, SMALL.num_requests, 1, SMALL.max_model_len, seed)
    rows = {r["system"]: r for r in mem.utilisation_rows(trace, SMALL)}
    paged, *static = [rows[s] for s in ("pagedserve", "static Oracle", "static Pow2",
                                        "static Max")]
    assert paged["at_peak"] > 0.9 and all(paged["at_peak"] > r["at_peak"] for r in static)
    busy = [r["busy_mean"] for r in (paged, *static)]
    assert busy[0] > 0.9 and busy == sorted(busy, reverse=True)


def test_every_trace_request_fits_max_model_len():
    trace = mem.make_trace(mem.SHAREGPT, 300, 2, 256, seed=3)
    assert all(len(r.prompt_token_ids) + n <= 256 for r in trace for n in r.output_lens)
    assert min(n for r in trace for n in r.output_lens) >= 1


def test_parallel_sampling_savings_grow_with_width():
    trace = mem.make_trace(mem.ALPACA, 48, 6, 2048, seed=0)
    saved = [mem.parallel_sampling_savings(trace, n, 16, concurrency=16) for n in (2, 4, 6)]
    assert 0 < saved[0] < saved[1] < saved[2] < 1


@pytest.mark.parametrize("prompt_len", [20, 32])  # last prompt block partial, or full
@pytest.mark.parametrize("n", [2, 4, 6])
def test_one_token_samples_save_the_shared_full_blocks(prompt_len, n):
    # Step 1 prefills all but the last prompt token: nothing is shared yet. Step 2 forks
    # the samples; each computes the last prompt token into its own copy of the shared last
    # block (n - 1 copies; one writes in place), draws its one token and ends.
    blocks = -(-prompt_len // 16)
    trace = [TraceRequest([7] * prompt_len, [1] * n)]
    expected = (0 + 1 - (blocks + n - 1) / (n * blocks)) / 2
    assert mem.parallel_sampling_savings(trace, n, 16, concurrency=1) == pytest.approx(expected)


def test_followers_hit_the_shared_full_blocks_of_the_prefix():
    result = mem.prefix_sharing(prefix_len=250, num_requests=5, block_size=16, seed=1)
    shared = 250 // 16 * 16
    assert result["hits_per_request"] == [0] + [shared] * 4
    assert result["hits"] == 4 * shared
    tokens = result["prefill_tokens"]
    assert tokens["without caching"] == result["queries"]
    assert tokens["with caching"] == tokens["without caching"] - 4 * shared


def run_cli(*args):
    return CliRunner().invoke(bench, ["memory", "--requests", "60", "--num-blocks", "256",
                                      "--max-model-len", "1024", "--sampling-requests", "8",
                                      "--concurrency", "4", "--prefix-requests", "3", *args])


def test_memory_command_prints_json_and_writes_the_plot(tmp_path):
    result = run_cli("--json", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["system"] for r in data["utilisation"]["rows"]] == [
        "pagedserve", "static Max", "static Pow2", "static Oracle"]
    assert [(r["kind"], r["width"]) for r in data["sharing"]["rows"]] == [
        ("parallel sampling", 2), ("parallel sampling", 4), ("parallel sampling", 6)]
    assert data["prefix"]["hits_per_request"] == [0, 256, 256]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "memory.png").exists() == has_matplotlib


def test_memory_command_rejects_a_pool_smaller_than_one_request(tmp_path):
    result = run_cli("--num-blocks", "8", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "8 blocks x 16 slots cannot hold one request of max_model_len 1024" in result.output


def test_memory_command_prints_tables_and_skips_the_plot_without_matplotlib(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = run_cli("--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "1. KV slot utilisation" in result.output and "96.3% vLLM" in result.output
    assert "plot skipped: matplotlib is not installed" in result.output
    assert not (tmp_path / "memory.png").exists()


def test_beams_share_blocks_and_leave_the_runner_empty(tmp_path):
    import torch

    from pagedserve.benchmarks.beam_memory import beam_search_savings
    from pagedserve.executor_svc.cache_engine import CacheEngine
    from pagedserve.executor_svc.model import ModelConfig, load_model
    from pagedserve.executor_svc.model_runner import ModelRunner
    from pagedserve.scheduler_svc.output_processor import OutputProcessor
    from tiny_models import make_tiny_model, word_tokenizer

    path = make_tiny_model("llama", tmp_path)
    cache = CacheEngine(ModelConfig.from_model_dir(path), 4, 256, 0, torch.float32, "cpu")
    runner = ModelRunner(load_model(path, torch.float32, torch.device("cpu")), cache, 4)
    processor = OutputProcessor(word_tokenizer(), lambda: 128)
    prompts = [[5 + i, 9, 13, 21, 30 + i] for i in range(4)]
    saved = [beam_search_savings(runner, processor, prompts, [12, 16, 10, 14], width, 2)
             for width in (2, 4)]
    assert 0 < saved[0] < saved[1] < 1  # wider searches share more of their prefixes
    assert runner.seqs == {}  # every beam was removed from the executor: safe to reuse
