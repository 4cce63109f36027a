"""The rounds of ``benchmarks/serve_vs_vllm.sh`` side by side: per round and system, what
``vllm bench serve`` measured (total and output tokens/s, median TTFT and ITL), the medians
over the rounds, and our ratio of total tokens/s to vLLM's in each round.

    python -m pagedserve.benchmarks.serve_summary benchmarks/results/serve_vs_vllm

Reads ``pagedserve-N.json`` and ``vllm-N.json`` (``--save-result`` files) from the folder.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

SYSTEMS = ("pagedserve", "vllm")
COLUMNS = (("total tok/s", "total_token_throughput"), ("output tok/s", "output_throughput"),
           ("median TTFT ms", "median_ttft_ms"), ("median ITL ms", "median_itl_ms"))


def load_rounds(folder: Path) -> dict[int, dict[str, dict]]:
    """round -> system -> its saved result; only rounds that both systems finished."""
    rounds: dict[int, dict[str, dict]] = {}
    for path in folder.glob("*-*.json"):
        found = re.fullmatch(r"(\w+)-(\d+)\.json", path.name)
        if found and found[1] in SYSTEMS:
            rounds.setdefault(int(found[2]), {})[found[1]] = json.loads(path.read_text())
    return {n: r for n, r in sorted(rounds.items()) if set(r) == set(SYSTEMS)}


def summary(rounds: dict[int, dict[str, dict]]) -> str:
    if not rounds:
        raise ValueError("no round with both systems' results")
    header = ["round", "system", *(name for name, _ in COLUMNS), "pagedserve / vllm"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratios = []
    for n, results in rounds.items():
        ratio = (results["pagedserve"]["total_token_throughput"]
                 / results["vllm"]["total_token_throughput"])
        ratios.append(ratio)
        for system in SYSTEMS:
            cells = [f"{results[system][key]:.1f}" for _, key in COLUMNS]
            last = f"{ratio:.2f}x" if system == "pagedserve" else ""
            lines.append("| " + " | ".join([str(n), system, *cells, last]) + " |")
    for system in SYSTEMS:
        cells = [f"{statistics.median(r[system][key] for r in rounds.values()):.1f}"
                 for _, key in COLUMNS]
        last = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}x)"
                if system == "pagedserve" else "")
        lines.append("| " + " | ".join(["median", system, *cells, last]) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pagedserve.benchmarks.serve_summary RESULT_DIR")
    print(summary(load_rounds(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
