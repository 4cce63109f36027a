"""Where the executor decides what computes its model, once, and binds it.

- **Attention** (``attention_backend``, chosen by the model runner): ``triton``, the paged
  Triton kernels (CUDA; CPU tensors under triton's interpreter); ``cpu``, the compiled CPU
  kernels, which is what ``--attention-backend torch`` runs on a CPU for float32 activations
  over a float32 or bfloat16 cache where the kernels built; else ``torch``, torch operators.
- **Layer ops** (``layer_ops``, bound by ``load_model``, and the sampler's greedy path):
  ``cpu`` where the compiled kernels serve float32 activations on a CPU, else ``torch``.

The model and the sampler call what was bound and never ask again.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.attention import AttentionBackend
from pagedserve.executor_svc.backends.cpu import CpuBackend, CpuOps
from pagedserve.executor_svc.backends.torch import TorchBackend
from pagedserve.executor_svc.cpu_features import cpu_info
from pagedserve.executor_svc.layer_ops import LayerOps, PackedLinear

BACKENDS = ("torch", "triton")  # what an executor is configured with


def attention_backend(name: str, block_size: int, device: torch.device | str,
                      dtype: torch.dtype, kv_dtype: torch.dtype,
                      null_block: int | None = None) -> AttentionBackend:
    """The backend that serves ``name`` for ``dtype`` activations over a ``kv_dtype`` cache of
    blocks of ``block_size`` on ``device`` (``null_block``: see ``TorchBackend``)."""
    if name == "triton":
        # Imported only when chosen: on CPU tensors, triton must be told to interpret first.
        from pagedserve.executor_svc.backends.triton import TritonBackend
        return TritonBackend(block_size, device)
    if name != "torch":
        raise ValueError(f"unknown attention backend {name!r}; expected one of "
                         f"{', '.join(BACKENDS)}")
    if cpu_kernels.serves(dtype, kv_dtype, device):
        return CpuBackend(block_size)
    return TorchBackend(block_size, device, null_block)


def layer_ops(dtype: torch.dtype, device: torch.device | str) -> LayerOps:
    """The layer ops for ``dtype`` activations on ``device``."""
    return CpuOps() if cpu_kernels.fuses(dtype, device) else LayerOps()


def chosen(model: nn.Module, attention: AttentionBackend, sampler_ops: LayerOps) -> dict[str, str]:
    """Which implementation serves each op of ``model`` here (``cpu``: our compiled kernels),
    and on a CPU what it has to offer them: for the log, ``pagedserve health`` and the
    benchmarks, so that every number names the path that made it."""
    linears = {getattr(module, "name", "torch") for module in model.modules()
               if isinstance(module, (nn.Linear, PackedLinear))}
    paths = {"attention": attention.name, "layer_ops": model.ops.name,
             "linear": "+".join(sorted(linears)), "greedy": sampler_ops.name}
    if "cpu" in paths.values() or "cpu" in linears:
        paths["cpu_kernels"] = cpu_kernels.BUILD
    if attention.device.type == "cpu":
        paths["cpu"] = cpu_info().describe()
    return paths
