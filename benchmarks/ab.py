"""A/B of server flags: ``pagedserve up`` with its defaults against ``up`` with other flags
(or environment variables), alternating run by run on one shared workload (the machine's
speed drifts: alternating spreads the drift over both sides).

    python -m pagedserve.benchmarks.ab --workload fixed --rounds 3 --flags=--no-async-scheduling
    python -m pagedserve.benchmarks.ab --workload mixed --env LRU_CACHE_CAPACITY=1024

Each run starts a fresh ``up``, warms it up, resets the prefix cache and times the workload
through the client; then reads the step cost from ``stats``. Prints every run and the medians,
and writes ``ab.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
from pathlib import Path

from pagedserve.benchmarks.compare import free_ports, request_sets, run_pagedserve


def run(workload: str, rounds: int, flags: list[str], env: dict[str, str], out: Path) -> dict:
    sets = request_sets([workload], 1, [], 1)
    tokens = sum(len(r["prompt"]) + r["output_len"] for r in sets[workload]["requests"])
    other = " ".join([*(f"{key}={value}" for key, value in env.items()), *flags])
    sides = {"defaults": ((), {}), other: (tuple(flags), env)}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for i in range(rounds):
        for name, (args, side_env) in sides.items():
            result = run_pagedserve(sets, free_ports(3), out, args=args, env=side_env,
                                    log_name=f"ab-{i}-{'a' if name == 'defaults' else 'b'}.log")
            cost = result["step_cost"]
            runs[name].append({"total_tok_s": tokens / result["results"][workload]["median_s"],
                               "step_ms_p50": cost["wall_ms_p50"],
                               "outside_forward_perc": cost["outside_forward_perc"],
                               "ahead_perc": cost["ahead_perc"]})
            print(f"{name}: {json.dumps(runs[name][-1])}", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flags", default="", help="The other side's flags, one string.")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="An environment variable of the other side's (repeatable).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ab"))
    args = parser.parse_args()
    env = dict(pair.split("=", 1) for pair in args.env)
    if not args.flags and not env:
        parser.error("nothing to compare: give --flags or --env")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = run(args.workload, args.rounds, shlex.split(args.flags), env, args.out)
    (args.out / "ab.json").write_text(json.dumps({"workload": args.workload, "runs": runs},
                                                 indent=1))
    print(f"| up | total tok/s ({args.workload}), median of {args.rounds} | step p50 (ms) | "
          f"outside the forward pass | steps sent ahead |")
    print("|---|---|---|---|---|")
    for name, side in runs.items():
        med = {key: statistics.median(r[key] for r in side) for key in side[0]}
        print(f"| {name} | {med['total_tok_s']:.1f} | {med['step_ms_p50']:.1f} | "
              f"{med['outside_forward_perc']:.2f}% | {med['ahead_perc']:.0f}% |")


if __name__ == "__main__":
    main()
