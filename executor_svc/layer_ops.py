"""A decoder layer's work besides attention (residual add + RMSNorm, SiLU(gate) * up, the
linear layers) and greedy sampling, bound once when the model loads.

``LayerOps`` does it in torch operators, with oneDNN's prepacked GEMM for the linear layers on
a CPU: on CUDA, and on a CPU where the compiled kernels do not serve. ``backends.cpu.CpuOps``
(a ``KernelOps``) overrides each op with its kernel, as ``backends.triton.TritonOps`` does on
CUDA; ``backends.layer_ops`` chooses between them, or ``autotune`` per op by timing them:
``ChosenOps`` holds its choices, and ``BucketedLinear`` its choice per number of rows for
each linear layer.
"""
from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.common.log import get_logger

log = get_logger("executor")


OPS = ("add_rms_norm", "silu_mul", "greedy")  # what a LayerOps does besides the linear layers


class LayerOps:
    """The ops in torch operators; the interface every variant implements."""

    name = "torch"

    def names(self) -> dict[str, str]:
        """The implementation of each op of ``OPS``, by name."""
        return dict.fromkeys(OPS, self.name)

    def add_rms_norm(self, x: Tensor | None, residual: Tensor, weight: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
        """The pre-norm layer's residual add and norm: ``residual + x`` (``residual`` alone
        when ``x`` is None) and its RMSNorm times ``weight``, as (norm, sum). All ``[T,
        hidden]``; a variant may write the sum into ``residual``."""
        if x is not None:
            residual = residual + x
        x32 = residual.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(residual.dtype), residual

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """``silu(gate) * up`` of ``gate_up`` (``[T, 2 * inter]``, gate columns first)."""
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up

    def greedy(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's argmax (``[S]`` int64, the first on ties) and its log-probability under
        the row's softmax (``[S]`` float32) of ``logits`` (any float dtype, widened)."""
        logits = logits.float()
        token_ids = logits.argmax(-1)
        logprobs = torch.log_softmax(logits, -1).gather(-1, token_ids[:, None]).squeeze(1)
        return token_ids, logprobs

    def pack_linear(self, weight: Tensor, bias: Tensor | None) -> PackedLinear | None:
        """``F.linear(x, weight, bias)`` with the weight packed once for a faster GEMM on a
        CPU, or None where nothing packs it here (``F.linear`` stays)."""
        return OneDnnLinear(weight, bias) if can_pack(weight.dtype) else None


class KernelOps(LayerOps):
    """The ops each one call of a kernel module's function of the same name and signature
    (``add_rms_norm``, which writes the sum into ``residual``, ``silu_mul``, ``greedy``):
    ``backends.cpu.CpuOps`` binds the C kernels, ``backends.triton.TritonOps`` Triton's."""

    kernels: ModuleType  # each variant's

    def add_rms_norm(self, x: Tensor | None, residual: Tensor, weight: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
        return self.kernels.add_rms_norm(x, residual, weight, eps), residual

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return self.kernels.silu_mul(gate_up)

    def greedy(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return self.kernels.greedy(logits.contiguous())


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` with the weight packed once (``F.linear`` packs it on
    every call). Holds only the packed weight: the dense one is not kept (a tied embedding
    keeps its own). Each variant packs in ``__init__`` and multiplies in ``matmul``."""

    name = "packed"  # each variant's own, in the kernels an executor reports

    def __init__(self, weight: Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        out = self.matmul(flat)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def matmul(self, x: Tensor) -> Tensor:
        """``[T, in]`` -> ``[T, out]``."""
        raise NotImplementedError

    def serving(self, rows: int) -> PackedLinear:
        """The layer that multiplies inputs of ``rows`` rows: this one."""
        return self


class OneDnnLinear(PackedLinear):
    """oneDNN's packed layout: it ran the decoder's GEMMs of a 32-token decode step at 95
    instead of 54 GFLOP/s (BENCHMARKS.md, "What changed in the executor")."""

    name = "onednn"

    def __init__(self, weight: Tensor, bias: Tensor | None, batch_hint: int = 32):
        super().__init__(weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else bias.detach().contiguous()

    def matmul(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1:
            # One row takes another kernel (a GEMV) that sums in another order: a token's
            # output would depend on whether others shared its step (in bf16, where outputs
            # are rounded to 8 bits, greedy tokens drifted under preemption). Two rows take
            # the GEMM every larger batch takes, whose rows do not depend on each other.
            return self.matmul(x.expand(2, -1).contiguous())[:1]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class TorchLinear(PackedLinear):
    """``F.linear`` itself, on the dense weight: nothing packed (oneDNN packs it at every
    call), kept as a candidate where that is fastest."""

    name = "torch"

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__(weight)
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()

    def matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class BucketedLinear(PackedLinear):
    """One linear layer in several implementations, each serving inputs of up to its number
    of rows (decode-sized steps and prefill-sized ones differ in what is fastest): ``layers``
    is ``[(max_rows, layer), ...]`` by increasing ``max_rows``, the last one None (any)."""

    def __init__(self, layers: list[tuple[int | None, PackedLinear]]):
        super().__init__(torch.empty(layers[0][1].out_features, layers[0][1].in_features,
                                     device="meta"))
        if layers[-1][0] is not None:
            raise ValueError(f"the last bucket must take any number of rows, not up to "
                             f"{layers[-1][0]}")
        self.limits = [limit for limit, _ in layers[:-1]]
        self.layers = nn.ModuleList(layer for _, layer in layers)
        self.name = ", ".join(f"{layer.name}{'<=' if limit else '>'}{limit or self.limits[-1]}"
                              for limit, layer in layers) + " rows"

    def matmul(self, x: Tensor) -> Tensor:
        return self.serving(x.shape[0]).matmul(x)

    def serving(self, rows: int) -> PackedLinear:
        for limit, layer in zip(self.limits, self.layers):
            if rows <= limit:
                return layer
        return self.layers[-1]


class ChosenOps(LayerOps):
    """Each op from the implementation chosen for it (``ops``: op name -> the LayerOps whose
    op is fastest here), bound once; each linear layer packed by ``pack``."""

    def __init__(self, ops: dict[str, LayerOps],
                 pack: Callable[[Tensor, Tensor | None], PackedLinear | None]):
        missing = set(OPS) - set(ops)
        if missing:
            raise ValueError(f"no implementation chosen for {', '.join(sorted(missing))}")
        self._names = {op: ops[op].name for op in OPS}
        self.add_rms_norm = ops["add_rms_norm"].add_rms_norm
        self.silu_mul = ops["silu_mul"].silu_mul
        self.greedy = ops["greedy"].greedy
        self.pack_linear = pack
        layer = {self._names["add_rms_norm"], self._names["silu_mul"]}
        self.name = layer.pop() if len(layer) == 1 else " ".join(
            f"{op}={self._names[op]}" for op in ("add_rms_norm", "silu_mul"))

    def names(self) -> dict[str, str]:
        return dict(self._names)


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked GEMM serves ``dtype`` on this CPU: float32 everywhere
    oneDNN is built in; bfloat16 only with native bf16 instructions (without them oneDNN has
    no fast kernel for it, and ``F.linear`` stays)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(model: nn.Module, ops: LayerOps) -> int:
    """Swap every CPU ``nn.Linear`` of ``model`` for ``ops``'s packed linear where it has one;
    returns how many were swapped. Each is checked against ``F.linear`` once: a mismatch
    leaves the model as it was and logs why."""
    packed = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
            continue
        try:
            layer = ops.pack_linear(module.weight, module.bias)
            if layer is None:
                continue
            _check_packed(layer, module)
        except (RuntimeError, AttributeError) as exc:
            log.warning("prepacked linear unavailable; using F.linear", error=str(exc))
            return 0
        packed[name] = layer
    for name, layer in packed.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return len(packed)


def _check_packed(layer: PackedLinear, dense: nn.Linear) -> None:
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(
        dense.weight.dtype)
    want, got = dense(x), layer(x)
    tolerance = 1e-4 if want.dtype == torch.float32 else 5e-2
    if not torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance):
        raise RuntimeError(f"packed GEMM differs from F.linear by "
                           f"{(got - want).abs().max().item():.3g}")
