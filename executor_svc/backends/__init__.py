"""Where the executor decides what computes its model, once, and binds it.

- **Attention** (``attention_backend``, chosen by the model runner): ``triton``, the paged
  Triton kernels (CUDA; CPU tensors under triton's interpreter); ``cpu``, the compiled CPU
  kernels, which is what ``--attention-backend torch`` runs on a CPU for float32 or bfloat16
  activations over a float32 or bfloat16 cache where the kernels built (and, given a
  ``Tuner``, where they time faster than torch's operators here); else ``torch``, torch
  operators.
- **Layer ops** (``layer_ops``, bound by ``load_model``, and the sampler's greedy path,
  ``sampler_ops``): ``triton`` on CUDA (norms, SiLU-mul, greedy), ``cpu``
  where the compiled kernels serve the activations on a CPU, else ``torch``. Given a
  ``Tuner`` (as the executor does on a CPU), ``load_model`` binds ``tuned.tuned_ops``
  instead: per op the fastest correct implementation measured here, and
  for each linear layer per bucket of rows (``autotune``).

The model and the sampler call what was bound and never ask again.
"""
from __future__ import annotations

import torch
from torch import device as Device, float32, nn  # (the name torch is this package's torch backend)

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.attention import AttentionBackend
from pagedserve.executor_svc.autotune import Tuner
from pagedserve.executor_svc.backends.cpu import CpuBackend, CpuOps
from pagedserve.executor_svc.backends.torch import TorchBackend
from pagedserve.executor_svc.cpu_features import cpu_info
from pagedserve.executor_svc.layer_ops import (BucketedLinear, ChosenOps, LayerOps,
                                               PackedLinear)
from pagedserve.executor_svc.model_config import ModelConfig

BACKENDS = ("torch", "triton")  # what an executor is configured with


def attention_backend(name: str, block_size: int, device: torch.device | str,
                      dtype: torch.dtype, kv_dtype: torch.dtype,
                      null_block: int | None = None, tuner: Tuner | None = None,
                      config: ModelConfig | None = None) -> AttentionBackend:
    """The backend that serves ``name`` for ``dtype`` activations over a ``kv_dtype`` cache of
    blocks of ``block_size`` on ``device`` (``null_block``: see ``TorchBackend``). Given a
    ``tuner`` and the model's ``config``, ``torch`` on a CPU is whichever of the compiled
    kernels and torch's operators attends faster here (``tuned.choose_attention``)."""
    if name == "triton":
        # Imported only when chosen: on CPU tensors, triton must be told to interpret first.
        from pagedserve.executor_svc.backends.triton import TritonBackend
        return TritonBackend(block_size, device)
    if name != "torch":
        raise ValueError(f"unknown attention backend {name!r}; expected one of "
                         f"{', '.join(BACKENDS)}")
    if not cpu_kernels.serves(dtype, kv_dtype, device):
        return TorchBackend(block_size, device, null_block)
    if tuner is not None and config is not None:
        from pagedserve.executor_svc.backends.tuned import choose_attention
        if choose_attention(tuner, config, block_size, dtype, kv_dtype) == "torch":
            return TorchBackend(block_size, device, null_block)
    return CpuBackend(block_size)


def layer_ops(dtype: torch.dtype, device: torch.device | str) -> LayerOps:
    """The layer ops for ``dtype`` activations on ``device``: on CUDA the Triton kernels'."""
    if Device(device).type == "cuda":
        from pagedserve.executor_svc.backends.triton import TritonOps  # triton compiles here
        return TritonOps()
    return CpuOps() if cpu_kernels.fuses(dtype, device) else LayerOps()


def sampler_ops(model: nn.Module) -> LayerOps:
    """The ops whose greedy sampling serves ``model``'s float32 logits: the model's own where
    they were tuned (``tuned_ops`` times greedy on float32 logits), else ``layer_ops``'s."""
    if isinstance(model.ops, ChosenOps):
        return model.ops
    return layer_ops(float32, model.model.embed_tokens.weight.device)


def chosen(model: nn.Module, attention: AttentionBackend, sampler_ops: LayerOps,
           dtype: str | None = None) -> dict[str, str]:
    """Which implementation serves each op of ``model`` here (``cpu``: our compiled kernels;
    a linear layer per bucket of rows, ``"cpu<=32, onednn>32 rows"``, and per shape where
    shapes differ), why its ``dtype`` where given, which steps run its decoder stack in one
    call (``model.stack``), and on a CPU what it has to offer them: for the log, ``pagedserve
    health`` and the benchmarks, so that every number names the path that made it."""
    linears = {}
    inner = {id(layer) for module in model.modules() if isinstance(module, BucketedLinear)
             for layer in module.layers}  # reported by their BucketedLinear
    for module in model.modules():
        if isinstance(module, (nn.Linear, PackedLinear)) and id(module) not in inner:
            shape = f"{module.out_features}x{module.in_features}"
            linears.setdefault(getattr(module, "name", "torch"), set()).add(shape)
    layer = model.ops.names()
    paths = {"attention": attention.name, "layer_ops": model.ops.name,
             "add_rms_norm": layer["add_rms_norm"], "silu_mul": layer["silu_mul"],
             "linear": _linear_names(linears), "greedy": sampler_ops.names()["greedy"]}
    if dtype is not None:
        paths["dtype"] = dtype
    if attention.device.type == "cpu":  # the build serving, or why none does: in health too
        paths["decoder"] = model.stack.describe() if model.stack else "a call per op"
        paths["cpu_kernels"] = cpu_kernels.describe()
        paths["cpu"] = cpu_info().describe()
    return paths


def _linear_names(linears: dict[str, set[str]]) -> str:
    """One name where every linear layer has it, else each name with the shapes it serves."""
    if len(linears) == 1:
        return next(iter(linears))
    return "; ".join(f"{', '.join(sorted(shapes))}: {name}"
                     for name, shapes in sorted(linears.items()))
