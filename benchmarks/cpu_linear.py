"""The decoder's GEMMs on the CPU: our packed kernel (``cpu_kernels.PackedWeight``, with float32 and
with bfloat16 weight panels) against oneDNN's prepacked GEMM and ``F.linear``.

    python -m pagedserve.benchmarks.cpu_linear --tokens 32 1 64 512 [--dtype bfloat16]

Each backend runs the four projections of every layer of SmolLM2's shape (30 layers, random
weights that are bfloat16 values, as in its checkpoint), one layer after another, so that, as
in a real step, each weight comes from memory rather than from the cache. The backends take
turns, ``--rounds`` times; the median time of a pass over all layers is printed, with its
GFLOP/s and its ratio to oneDNN's. ``--dtype bfloat16`` runs a bf16 model's case: bfloat16
weights, inputs and outputs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.layer_ops import OneDnnLinear

HIDDEN, INTER, Q_WIDTH, KV_WIDTH, LAYERS = 576, 1536, 576, 192, 30
SHAPES = [(HIDDEN, Q_WIDTH + 2 * KV_WIDTH), (Q_WIDTH, HIDDEN), (HIDDEN, 2 * INTER),
          (INTER, HIDDEN)]  # (in, out): qkv, o, gate_up, down


def backends(weights: list[torch.Tensor]) -> dict[str, list]:
    """name -> per weight, a function of the input (in the weights' dtype)."""
    out = {"F.linear": [lambda x, w=w: F.linear(x, w) for w in weights]}
    out["oneDNN packed"] = [OneDnnLinear(w, None, batch_hint=32) for w in weights]
    if cpu_kernels.load() is not None:
        panels = (("ours f32 panels", False),) if weights[0].dtype == torch.float32 else ()
        for name, allow_bf16 in panels + (("ours bf16 panels", True),):
            out[name] = [cpu_kernels.PackedWeight(w, None, allow_bf16) for w in weights]
    return out


def smollm2_weights(dtype: torch.dtype) -> list[torch.Tensor]:
    """The projection weights of SmolLM2's 30 layers, random bfloat16 values in ``dtype``."""
    torch.manual_seed(0)
    return [torch.randn(n, k).mul_(0.05).bfloat16().to(dtype)
            for _ in range(LAYERS) for k, n in SHAPES]


def measure(funcs: dict[str, list], weights: list[torch.Tensor], tokens: int,
            rounds: int) -> dict[str, float]:
    """name -> median seconds of one pass of ``tokens`` rows through every layer (each
    backend checked against ``F.linear`` first), and "flops" -> that pass's work."""
    inputs = [torch.randn(tokens, w.shape[1]).to(w.dtype) for w in weights]
    tolerance = 1e-4 if weights[0].dtype == torch.float32 else 2e-2
    reference = [F.linear(x, w) for x, w in zip(inputs[:4], weights[:4])]
    times = {name: [] for name in funcs}
    for name, fs in funcs.items():  # warm up, and check against F.linear
        for f, x, want in zip(fs, inputs, reference):
            torch.testing.assert_close(f(x), want, rtol=tolerance, atol=tolerance)
    for _ in range(rounds):
        for name, fs in funcs.items():
            start = time.perf_counter()
            for f, x in zip(fs, inputs):
                f(x)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return medians | {"flops": 2 * tokens * sum(k * n for k, n in SHAPES) * LAYERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    weights = smollm2_weights(getattr(torch, args.dtype))
    funcs = backends(weights)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    for tokens in args.tokens:
        times = measure(funcs, weights, tokens, args.rounds)
        flops = times.pop("flops")
        base = times["oneDNN packed"]
        for name, median in times.items():
            print(f"{tokens:5d} tokens  {name:17s} {median * 1e3:8.1f} ms "
                  f"{flops / median / 1e9:6.1f} GFLOP/s  {base / median:5.2f}x oneDNN")


if __name__ == "__main__":
    main()
