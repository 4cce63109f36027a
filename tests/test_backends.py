"""What computes the model is chosen once: the attention backend per executor, the layer ops
when the model loads; each backend builds only the metadata its kernels read."""
from __future__ import annotations

import pytest
import torch

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.backends import attention_backend, layer_ops
from pagedserve.executor_svc.backends.cpu import CpuBackend, CpuMetadata, CpuOps, KernelLinear
from pagedserve.executor_svc.backends.torch import TorchBackend, TorchMetadata
from pagedserve.executor_svc.layer_ops import LayerOps
from pagedserve.executor_svc.model import load_model
from tiny_models import make_tiny_model

F32, BF16 = torch.float32, torch.bfloat16
built = pytest.mark.skipif(cpu_kernels.load() is None,
                           reason="the CPU kernels did not build here (no C compiler?)")


@built
def test_torch_attention_on_a_cpu_is_the_compiled_kernels_where_they_serve():
    assert isinstance(attention_backend("torch", 16, "cpu", F32, F32), CpuBackend)
    assert isinstance(attention_backend("torch", 16, "cpu", F32, BF16), CpuBackend)
    assert isinstance(attention_backend("torch", 16, "cpu", BF16, BF16), CpuBackend)
    assert isinstance(layer_ops(F32, "cpu"), CpuOps) and isinstance(layer_ops(BF16, "cpu"), CpuOps)


@pytest.mark.parametrize("dtype, kv_dtype", [(F32, torch.float16), (torch.float16, F32)])
def test_dtypes_the_kernels_do_not_read_take_torch_operators(dtype, kv_dtype):
    backend = attention_backend("torch", 16, "cpu", dtype, kv_dtype, null_block=7)
    assert isinstance(backend, TorchBackend) and backend.null_block == 7
    assert type(layer_ops(torch.float16, "cpu")) is LayerOps


def test_without_the_kernels_everything_takes_torch_operators(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    assert isinstance(attention_backend("torch", 16, "cpu", F32, F32), TorchBackend)
    assert type(layer_ops(F32, "cpu")) is LayerOps


def test_on_cuda_the_layer_ops_are_the_triton_kernels():
    ops = layer_ops(F32, "cuda")
    assert ops.names() == {"add_rms_norm": "triton", "silu_mul": "triton", "greedy": "triton"}


def test_triton_is_chosen_by_name_and_an_unknown_name_is_refused():
    assert attention_backend("triton", 16, "cpu", F32, F32).name == "triton"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; expected one of "
                                         "torch, triton"):
        attention_backend("flash", 16, "cpu", F32, F32)


def test_each_backend_builds_only_what_its_kernels_read():
    step = ([[3, 6], [1, 2], [0]], [4, 3, 0], [1, 2, 3])
    kernel = CpuBackend(4).build(*step)
    assert type(kernel) is CpuMetadata and not hasattr(kernel, "decode_mask")
    assert kernel.batch.lens.tolist() == [5, 5, 3] and kernel.backend.name == "cpu"
    gathered = TorchBackend(4, "cpu", null_block=9).build(*step)
    assert type(gathered) is TorchMetadata and not hasattr(gathered, "batch")
    triton = attention_backend("triton", 4, "cpu", F32, F32).build(*step)
    assert triton.seq_lens.dtype == triton.block_tables.dtype == torch.int32
    assert (triton.max_query_len, triton.max_seq_len) == (3, 5)
    for meta in (kernel, gathered, triton):
        assert meta.positions.tolist() == [4, 3, 4, 0, 1, 2]
        assert meta.last_token_indices.tolist() == [0, 2, 5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("llama_tied", tmp_path_factory.mktemp("llama_tied"))


@built
def test_the_model_binds_its_ops_at_load(model_dir):
    model = load_model(model_dir, F32, "cpu")
    assert model.ops.name == "cpu"
    layer = model.model.layers[0]
    assert layer.input_layernorm.add_rms_norm == model.ops.add_rms_norm
    assert layer.mlp.silu_mul == model.ops.silu_mul
    assert isinstance(layer.mlp.down_proj, KernelLinear)
    assert isinstance(model.packed_head, KernelLinear)  # the tied head's own packed copy


def test_a_model_loaded_without_the_kernels_keeps_torch_ops(model_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    model = load_model(model_dir, F32, "cpu")
    assert model.ops.name == "torch"
    assert model.model.norm.add_rms_norm == model.ops.add_rms_norm
    assert not any(isinstance(m, KernelLinear) for m in model.modules())
