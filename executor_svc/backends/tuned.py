"""The candidates ``autotune`` times for one model on a CPU, and the ops bound from its
choices: our compiled kernels (``backends.cpu``) against torch's operators and oneDNN
(``layer_ops``), per op, and for each linear layer's shape per bucket of rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.common.log import get_logger
from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.autotune import ColdCaches, Tuner, dtype_tolerance
from pagedserve.executor_svc.backends.cpu import CpuOps, KernelLinear
from pagedserve.executor_svc.layer_ops import (OPS, BucketedLinear, ChosenOps, LayerOps,
                                               OneDnnLinear, PackedLinear, TorchLinear,
                                               can_pack)
from pagedserve.executor_svc.model_config import ModelConfig

log = get_logger("executor")


class Bucket(NamedTuple):
    """Inputs of up to ``max_rows`` rows (None: any more), timed at ``rows``."""

    max_rows: int | None
    rows: int


# Decode steps feed the linear layers a row per sequence; prefill steps hundreds. Decode
# batches of 33-128 have their own bucket: timed at 256 rows, a float32 GEMM could be bound
# to oneDNN for 64-row decode steps where ours was the faster there, and such steps then ran
# op by op instead of in one call (BENCHMARKS.md, "Issue 22 held to AVX2 on Zen 4").
BUCKETS = (Bucket(32, 32), Bucket(128, 64), Bucket(None, 256))
# A prefill-sized GEMM is bound by arithmetic, not by streaming the weight: a wide one (the
# LM head) is timed on this many of its output columns, at the same speed per column.
PREFILL_COLUMNS = 2048
LINEARS = {"cpu": KernelLinear, "onednn": OneDnnLinear, "torch": TorchLinear}
# Parts (first row, rows) of a probe batch that a low-precision linear must compute as it
# computes them within the whole batch: one row, a few, about a decode bucket's bounds, a
# prefill's. oneDNN's bf16 GEMM on AMX failed some of these for four of SmolLM2's five shapes
# (BENCHMARKS.md, "Issue 22 on AMX").
PROBE_ROWS = 300
PROBE_PARTS = ((0, 1), (PROBE_ROWS - 1, 1), (3, 5), (0, 16), (8, 32), (0, 33), (40, 256))


def linear_candidates(dtype: torch.dtype) -> list[str]:
    """The linear implementations that serve ``dtype`` weights on this CPU. ``F.linear`` on
    bfloat16 weights is left out where oneDNN's prepacked GEMM serves them: it reorders the
    weight anew for every row count it meets and oneDNN's primitive cache keeps each copy (the
    LM head's is 56 MB), so the executor grew by ~100 MB per thousand requests of varying
    batch (tests/test_load_e2e.py on a Zen 4, where it had won the LM head's >32-row bucket by
    1%)."""
    names = ["cpu"] if cpu_kernels.fuses(dtype, "cpu") else []
    if can_pack(dtype):
        return names + ["onednn"] + (["torch"] if dtype != torch.bfloat16 else [])
    return names + ["torch"]


def op_candidates(dtype: torch.dtype) -> dict[str, LayerOps]:
    """The layer ops that serve ``dtype`` activations on this CPU, by name."""
    return {"cpu": CpuOps(), "torch": LayerOps()} if cpu_kernels.fuses(dtype, "cpu") else {
        "torch": LayerOps()}


class LinearTuning:
    """Packs each linear layer in the implementation chosen, per bucket of rows, for its
    shape: timed on the first weight of each shape (its real values: our GEMM streams
    bfloat16 where they all are bfloat16 values), then bound for every layer of it.

    In bfloat16 (and float16) one implementation serves every bucket: the one with the least
    time per output value over all of them. Two GEMMs add their float32 sums in different
    orders, and each layer's output is rounded to 8 bits of mantissa, so a last-bit difference
    changes the rounding of some values: a token's hidden states would then depend on
    whether it was computed in a decode step or in a prompt's prefill (a recomputed
    preemption, a replaced executor, a step with a prompt beside it), and greedy outputs
    drifted (tests/test_preemption_e2e.py and test_recovery_e2e.py on a Zen 4, where our GEMM
    won the decode bucket and oneDNN the prefill one). In float32 the outputs are not rounded
    so: a difference stays in the last bit, and each bucket keeps its fastest."""

    def __init__(self, tuner: Tuner, dtype: torch.dtype):
        self.tuner = tuner
        self.dtype = dtype
        self.candidates = linear_candidates(dtype)
        self.plans: dict[str, list[tuple[int | None, str]]] = {}

    def pack(self, weight: Tensor, bias: Tensor | None) -> PackedLinear:
        """``F.linear(x, weight, bias)`` in the implementation chosen for each bucket."""
        key = self.shape_key(weight, bias)
        built: dict[str, PackedLinear] = {}
        if key not in self.plans:
            self.plans[key] = self._tune(key, weight, bias, built)
        layers = [(limit, built.get(name) or built.setdefault(name, LINEARS[name](weight, bias)))
                  for limit, name in self.plans[key]]
        if len({name for _, name in self.plans[key]}) == 1:
            return layers[0][1]
        return BucketedLinear(layers)

    def shape_key(self, weight: Tensor, bias: Tensor | None) -> str:
        """What decides the speed of a linear layer: its shape, bias, dtype and, in float32,
        whether its values are all bfloat16 ones (then our GEMM streams half the bytes)."""
        out_features, in_features = weight.shape
        exact = (self.dtype == torch.float32
                 and torch.equal(weight.to(torch.bfloat16).float(), weight))
        return (f"{out_features}x{in_features}{' +bias' if bias is not None else ''} "
                f"{str(self.dtype).removeprefix('torch.')}{' bf16-valued' if exact else ''}")

    def _tune(self, key: str, weight: Tensor, bias: Tensor | None,
              built: dict[str, PackedLinear]) -> list[tuple[int | None, str]]:
        plan, timed = [], []
        admit = None  # probed once per shape, and only where a bucket is timed
        if self.dtype != torch.float32:
            admit = functools.cache(functools.partial(self._batch_invariant, key, weight,
                                                      bias, built))
        cold = ColdCaches()  # for the decode buckets: there each weight comes from memory
        for bucket, previous in zip(BUCKETS, (None, *BUCKETS)):
            w, b, layers = weight, bias, built
            if bucket.max_rows is None and weight.shape[0] > PREFILL_COLUMNS:
                w, b, layers = weight[:PREFILL_COLUMNS], None if bias is None else \
                    bias[:PREFILL_COLUMNS], {}
            candidates = {name: _lazy_matmul(name, w, b, layers) for name in self.candidates}
            x = torch.randn(bucket.rows, weight.shape[1],
                            generator=torch.Generator().manual_seed(0)).to(self.dtype)
            choice = self.tuner.choose(
                "linear", f"{key} rows{'<=' if bucket.max_rows else '>'}"
                          f"{bucket.max_rows or previous.max_rows}", candidates,
                lambda x=x: (x,), lambda x, w=w, b=b: F.linear(x, w, b),
                dtype_tolerance(self.dtype), cold if bucket.max_rows is not None else None,
                admit)
            plan.append((bucket.max_rows, choice.name))
            timed.append((choice.seconds, bucket.rows * w.shape[0]))
        if self.dtype != torch.float32 and len({name for _, name in plan}) > 1:
            plan = [(None, one_for_every_bucket(timed))]
            log.info("linear: one implementation for every row count", shape=key,
                     choice=plan[0][1])
        return plan

    def _batch_invariant(self, key: str, weight: Tensor, bias: Tensor | None,
                         built: dict[str, PackedLinear], names: tuple[str, ...]) -> list[str]:
        """Those of ``names`` that give each row the same output whatever rows share its call
        (``batch_invariant``), or all of them where none does. In a low-precision model a
        last-bit difference changes a rounding, and a token's hidden states would depend on
        the step that computed it; greedy outputs drift under preemption."""
        kept = [name for name in names
                if batch_invariant(_lazy_matmul(name, weight, bias, built), weight.shape[1],
                                   self.dtype)]
        for name in set(names) - set(kept):
            log.info("linear: rows depend on the batch; left out", shape=key, implementation=name)
        if not kept:
            log.warning("linear: every implementation's rows depend on the batch", shape=key)
        return kept or list(names)


def batch_invariant(matmul, in_features: int, dtype: torch.dtype) -> bool:
    """Whether ``matmul`` computes each part of a probe batch (``PROBE_PARTS``) bit for bit
    as it computes those rows within the whole."""
    x = torch.randn(PROBE_ROWS, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    whole = matmul(x)
    return all(torch.equal(matmul(x[first:first + rows].contiguous()), whole[first:first + rows])
               for first, rows in PROBE_PARTS)


def one_for_every_bucket(timed: list[tuple[dict[str, float], int]]) -> str:
    """Of the candidates timed in every bucket (``(seconds by name, output values)`` each),
    the one with the least time per output value summed over the buckets (a decode row and a
    prompt's row count alike)."""
    names = sorted(set.intersection(*(set(seconds) for seconds, _ in timed)))
    if not names:
        raise ValueError("no linear implementation was timed in every bucket")
    return min(names, key=lambda name: sum(seconds[name] / values for seconds, values in timed))


def _lazy_matmul(name: str, weight: Tensor, bias: Tensor | None,
                 layers: dict[str, PackedLinear]):
    """``name``'s matmul of ``weight``, packed on first call and kept in ``layers``."""
    def matmul(x: Tensor) -> Tensor:
        if name not in layers:
            layers[name] = LINEARS[name](weight, bias)
        return layers[name].matmul(x)
    return matmul


def tuned_ops(tuner: Tuner, config: ModelConfig, dtype: torch.dtype) -> ChosenOps:
    """The fastest correct implementation of each layer op for ``config``'s shapes in
    ``dtype`` (greedy sampling: of float32 logits), and its linear layers packed by
    ``LinearTuning``."""
    chosen = {op: _choose_op(tuner, op, config, torch.float32 if op == "greedy" else dtype)
              for op in OPS}
    return ChosenOps(chosen, LinearTuning(tuner, dtype).pack)


def _choose_op(tuner: Tuner, op: str, config: ModelConfig, dtype: torch.dtype) -> LayerOps:
    impls = op_candidates(dtype)
    width = {"add_rms_norm": config.hidden_size, "silu_mul": 2 * config.intermediate_size,
             "greedy": config.vocab_size}[op]
    key = f"width={width} rows={'+'.join(str(b.rows) for b in BUCKETS)} " \
          f"{str(dtype).removeprefix('torch.')}"

    def make_inputs() -> list[tuple]:
        gen = torch.Generator().manual_seed(0)
        sets = []
        for bucket in BUCKETS:
            x = torch.randn(bucket.rows, width, generator=gen).to(dtype)
            sets.append((x,) if op != "add_rms_norm" else (
                x, torch.randn(bucket.rows, width, generator=gen).to(dtype),
                torch.rand(width, generator=gen).to(dtype), config.rms_norm_eps))
        return sets

    def call(impl: LayerOps):
        return lambda *sets: tuple(out for args in sets
                                   for out in _as_tuple(getattr(impl, op)(*args)))

    choice = tuner.choose(op, key, {name: call(impl) for name, impl in impls.items()},
                          make_inputs, call(LayerOps()), dtype_tolerance(dtype))
    return impls[choice.name]


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def choose_dtype(tuner: Tuner, config: ModelConfig) -> str:
    """``bfloat16`` or ``float32``, whichever runs ``config``'s decoder layer (without
    attention) and LM head faster here with the ops tuned for it, on decode- and
    prefill-sized steps (cached like any choice)."""
    proxies = {str(dtype).removeprefix("torch."): _LayerProxy(tuner, config, dtype)
               for dtype in (torch.bfloat16, torch.float32)}
    reference = _LayerProxy.reference(config)
    choice = tuner.choose("dtype", f"{config.hidden_size}x{config.intermediate_size} "
                                   f"heads={config.num_heads}/{config.num_kv_heads}x"
                                   f"{config.head_dim} vocab={config.vocab_size}",
                          proxies, reference.inputs, reference, _PROXY_TOLERANCE)
    return choice.name


_PROXY_TOLERANCE = 0.1  # a chain of bfloat16 roundings against float32


class _LayerProxy:
    """A decoder layer's work besides attention, and the LM head, on random bfloat16-valued
    weights of ``config``'s shapes, computed by the ops tuned for ``dtype``."""

    def __init__(self, tuner: Tuner | None, config: ModelConfig, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        hidden, q = config.hidden_size, config.num_heads * config.head_dim
        shapes = {"qkv": (q + 2 * config.num_kv_heads * config.head_dim, hidden),
                  "o": (hidden, q), "gate_up": (2 * config.intermediate_size, hidden),
                  "down": (hidden, config.intermediate_size), "head": (config.vocab_size, hidden)}
        weights = {name: (torch.randn(shape, generator=gen) * shape[1] ** -0.5).bfloat16()
                   for name, shape in shapes.items()}
        self.config, self.dtype = config, dtype
        self.ops = LayerOps() if tuner is None else tuned_ops(tuner, config, dtype)
        pack = ((lambda w, b: TorchLinear(w, b)) if tuner is None else self.ops.pack_linear)
        self.linears = {name: pack(w.to(dtype), None) for name, w in weights.items()}
        self.norm = torch.ones(hidden, dtype=dtype)

    @classmethod
    def reference(cls, config: ModelConfig) -> _LayerProxy:
        """The proxy in float32 torch operators."""
        return cls(None, config, torch.float32)

    def inputs(self) -> list[Tensor]:
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(b.rows, self.config.hidden_size, generator=gen) for b in BUCKETS]

    def __call__(self, *xs: Tensor) -> tuple[Tensor, ...]:
        outs = []
        for x in xs:
            x = x.to(self.dtype)
            eps = self.config.rms_norm_eps
            hidden, residual = self.ops.add_rms_norm(None, x.clone(), self.norm, eps)
            hidden = self.linears["o"](self.linears["qkv"](hidden)[:, :self.linears["o"]
                                                                   .in_features])
            hidden, residual = self.ops.add_rms_norm(hidden, residual, self.norm, eps)
            hidden = self.linears["down"](self.ops.silu_mul(self.linears["gate_up"](hidden)))
            outs.append(hidden.float())
        outs.append(self.linears["head"](xs[0].to(self.dtype)).float())
        return tuple(outs)


# The steps attention is timed on, as (sequences, cached tokens each, new tokens each): a
# decode step of 32 sequences over 256 tokens of context, and a 512-token prompt.
ATTENTION_STEPS = ((32, 256, 1), (1, 0, 512))


def choose_attention(tuner: Tuner, config: ModelConfig, block_size: int, dtype: torch.dtype,
                     kv_dtype: torch.dtype) -> str:
    """``cpu`` (the compiled kernels) or ``torch`` (torch's operators, its fused attention
    for prompts): whichever attends faster here over ``config``'s heads, one layer of
    ``ATTENTION_STEPS`` on a cache of ``kv_dtype`` blocks, among those that agree with
    torch's."""
    from pagedserve.executor_svc.backends.cpu import CpuBackend
    from pagedserve.executor_svc.backends.torch import TorchBackend

    layouts, first_free = [], 0
    for seqs, cached, new in ATTENTION_STEPS:
        blocks = -(-(cached + new) // block_size)
        tables = [list(range(first_free + i * blocks, first_free + (i + 1) * blocks))
                  for i in range(seqs)]
        first_free += seqs * blocks
        layouts.append((tables, [cached] * seqs, [new] * seqs))
    null_block = first_free  # past every table, zeros: the torch backend pads with it
    backends = {"cpu": CpuBackend(block_size), "torch": TorchBackend(block_size, "cpu",
                                                                     null_block)}
    if not cpu_kernels.serves(dtype, kv_dtype, "cpu"):
        del backends["cpu"]
    metas = {name: [backend.build(*layout) for layout in layouts]
             for name, backend in backends.items()}
    scale = config.head_dim ** -0.5

    def make_inputs() -> tuple[dict[str, tuple[Tensor, Tensor]],
                               list[tuple[Tensor, Tensor, Tensor]]]:
        gen = torch.Generator().manual_seed(0)
        shape = (null_block + 1, block_size, config.num_kv_heads, config.head_dim)
        k_cache, v_cache = (torch.randn(shape, generator=gen).to(kv_dtype) for _ in range(2))
        k_cache[null_block], v_cache[null_block] = 0, 0
        steps = []
        for tables, cached, new in layouts:
            slots = torch.tensor([table[pos // block_size] * block_size + pos % block_size
                                  for table, c, q in zip(tables, cached, new)
                                  for pos in range(c, c + q)])
            query = torch.randn(len(slots), config.num_heads, config.head_dim,
                                generator=gen).to(dtype)
            # the new tokens' keys and values, as the cache holds them
            steps.append((query, k_cache.flatten(0, 1)[slots].to(dtype),
                          v_cache.flatten(0, 1)[slots].to(dtype)))
        # each backend's cache holds the same values, in the layout it keeps
        caches = {name: backend.from_rows(k_cache, v_cache, dtype)
                  for name, backend in backends.items()}
        return caches, steps

    def call(name: str):
        def run(caches: dict[str, tuple[Tensor, Tensor]], steps) -> tuple[Tensor, ...]:
            k_cache, v_cache = caches[name]
            return tuple(backends[name].attend(query, key, value, k_cache, v_cache, meta,
                                               scale)
                         for (query, key, value), meta in zip(steps, metas[name]))
        return run

    steps = ",".join(f"{s}x({c}+{n})" for s, c, n in ATTENTION_STEPS)
    key = (f"heads={config.num_heads}/{config.num_kv_heads}x{config.head_dim} "
           f"block={block_size} steps={steps} {str(dtype).removeprefix('torch.')} "
           f"kv={str(kv_dtype).removeprefix('torch.')}")
    # A decode step reads each layer's context from memory (every layer's cache together far
    # outgrows the CPU's caches): timed hot, torch's gathered decode tied ours on an AMX Xeon
    # and was bound, and in real steps it took ten times as long (BENCHMARKS.md, "Issue 22
    # on AMX").
    choice = tuner.choose("attention", key, {name: call(name) for name in backends},
                          make_inputs, call("torch"), dtype_tolerance(dtype), ColdCaches())
    return choice.name
