"""``benchmarks/serve_summary``: the rounds of serve_vs_vllm.sh, each round's ratio and the
medians, from ``vllm bench serve``'s saved results."""
from __future__ import annotations

import json

import pytest

from pagedserve.benchmarks.serve_summary import load_rounds, summary


def saved(folder, name, total, ttft=100.0):
    (folder / name).write_text(json.dumps({
        "total_token_throughput": total, "output_throughput": total / 3,
        "median_ttft_ms": ttft, "median_itl_ms": 50.0, "num_prompts": 32}))


def test_every_round_s_ratio_and_the_medians(tmp_path):
    for n, ours, theirs in ((1, 900.0, 750.0), (2, 700.0, 700.0), (3, 880.0, 800.0)):
        saved(tmp_path, f"pagedserve-{n}.json", ours)
        saved(tmp_path, f"vllm-{n}.json", theirs)
    saved(tmp_path, "pagedserve-4.json", 1000.0)  # a round vLLM did not finish: left out
    (tmp_path / "summary.json").write_text("{}")
    rounds = load_rounds(tmp_path)
    assert list(rounds) == [1, 2, 3]
    lines = summary(rounds).splitlines()
    assert lines[2] == "| 1 | pagedserve | 900.0 | 300.0 | 100.0 | 50.0 | 1.20x |"
    assert lines[3] == "| 1 | vllm | 750.0 | 250.0 | 100.0 | 50.0 |  |"
    assert lines[-2] == ("| median | pagedserve | 880.0 | 293.3 | 100.0 | 50.0 | "
                         "1.10x (1.00–1.20x) |")
    assert lines[-1] == "| median | vllm | 750.0 | 250.0 | 100.0 | 50.0 |  |"


def test_no_finished_round_is_a_clear_error(tmp_path):
    saved(tmp_path, "pagedserve-1.json", 900.0)
    with pytest.raises(ValueError, match="no round with both"):
        summary(load_rounds(tmp_path))
