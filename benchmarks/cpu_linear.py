"""The decoder's GEMMs on the CPU: our packed kernel (``cpu_kernels.PackedWeight``, with float32 and
with bfloat16 weight panels) against oneDNN's prepacked GEMM and ``F.linear``.

    python -m pagedserve.benchmarks.cpu_linear --tokens 32 1 64 512 [--dtype bfloat16]

Each backend runs the four projections of every layer of SmolLM2's shape (30 layers, random
weights that are bfloat16 values, as in its checkpoint), one layer after another, so that, as
in a real step, each weight comes from memory rather than from the cache. The backends take
turns, ``--rounds`` times; the median time of a pass over all layers is printed, with its
GFLOP/s and its ratio to oneDNN's. ``--dtype bfloat16`` runs a bf16 model's case: bfloat16
weights, inputs and outputs. ``--mlp`` runs each layer's gate/up projection and SiLU-mul
instead: ours in one pass (``PackedWeight.silu_mul``, as the decoder stack runs it), ours in
two calls, and oneDNN's GEMM then torch's SiLU-mul.
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


def mlp_backends(weights: list[torch.Tensor]) -> dict[str, list]:
    """name -> per gate/up weight, its projection of the input ending in SiLU-mul."""
    ours = [cpu_kernels.PackedWeight(w, None) for w in weights]
    return {"oneDNN, torch SiLU": [lambda x, f=f: silu_mul(f(x))
                                   for f in (OneDnnLinear(w, None, batch_hint=32)
                                             for w in weights)],
            "ours, two calls": [lambda x, f=f: cpu_kernels.silu_mul(f(x)) for f in ours],
            "ours, one pass": [f.silu_mul for f in ours]}


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def smollm2_weights(dtype: torch.dtype, shapes=SHAPES) -> list[torch.Tensor]:
    """The projection weights (``shapes``: (in, out) of each) of SmolLM2's 30 layers, random
    bfloat16 values in ``dtype``."""
    torch.manual_seed(0)
    return [torch.randn(n, k).mul_(0.05).bfloat16().to(dtype)
            for _ in range(LAYERS) for k, n in shapes]


def measure(funcs: dict[str, list], weights: list[torch.Tensor], tokens: int,
            rounds: int, then=lambda out: out) -> dict[str, float]:
    """name -> median seconds of one pass of ``tokens`` rows through every layer (each
    backend checked against ``F.linear``, ``then`` applied, first), and "flops" -> that
    pass's GEMM work."""
    inputs = [torch.randn(tokens, w.shape[1]).to(w.dtype) for w in weights]
    tolerance = 1e-4 if weights[0].dtype == torch.float32 else 2e-2
    reference = [then(F.linear(x, w)) for x, w in zip(inputs[:4], weights[:4])]
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
    return medians | {"flops": 2 * tokens * sum(w.numel() for w in weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mlp", action="store_true",
                        help="Each layer's gate/up projection and SiLU-mul.")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.mlp:
        weights = smollm2_weights(dtype, [(HIDDEN, 2 * INTER)])
        funcs, then, base_name = mlp_backends(weights), silu_mul, "oneDNN, torch SiLU"
    else:
        weights = smollm2_weights(dtype)
        funcs, then, base_name = backends(weights), (lambda out: out), "oneDNN packed"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    for tokens in args.tokens:
        times = measure(funcs, weights, tokens, args.rounds, then)
        flops = times.pop("flops")
        base = times[base_name]
        for name, median in times.items():
            print(f"{tokens:5d} tokens  {name:18s} {median * 1e3:8.1f} ms "
                  f"{flops / median / 1e9:6.1f} GFLOP/s  {base / median:5.2f}x oneDNN")


if __name__ == "__main__":
    main()
