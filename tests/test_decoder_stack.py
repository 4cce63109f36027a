"""The decoder stack in one kernel call (decoder.c, ``cpu_kernels.DecoderStack``; the model
runs it as its ``stack``, a ``backends.cpu.FusedDecoder``): the same outputs and cache writes
as the model's forward through the same kernels one call at a time, bit for bit, and only for
the steps whose every op is ours."""
from __future__ import annotations

import pytest
import torch

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.backends import attention_backend, chosen
from pagedserve.executor_svc.backends.cpu import FusedDecoder, KernelLinear
from pagedserve.executor_svc.backends.torch import TorchBackend
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.layer_ops import BucketedLinear, LayerOps, OneDnnLinear
from pagedserve.executor_svc.model import load_model
from tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None,
                                reason="the CPU kernels did not build here (no C compiler?)")
BLOCK_SIZE, NUM_BLOCKS = 4, 16
# A prompt chunk of 6 tokens over 2 cached ones beside a decode row over 9 cached ones: rows
# of prefill and decode in one step, tables out of order.
STEP = ([[5, 2, 9], [7, 0, 3]], [2, 9], [6, 1])


def _model(tmp_path_factory, kind: str, dtype: torch.dtype):
    path = make_tiny_model(kind, tmp_path_factory.mktemp(kind))
    return load_model(path, dtype, "cpu")


def _caches(model, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    caches = CacheEngine(model.config, BLOCK_SIZE, NUM_BLOCKS, 0, dtype, "cpu").kv_caches
    gen = torch.Generator().manual_seed(0)
    for k_cache, v_cache in caches:  # a context already cached, as earlier steps left it
        k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
        v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
    return caches


def assert_one_call_is_op_by_op(model, dtype: torch.dtype) -> None:
    """The stack's hidden states and every layer's K/V writes are ``model``'s per-op forward's
    (``dtype``: its activations and cache), bit for bit, for a step of prompt and decode rows."""
    attention = attention_backend("torch", BLOCK_SIZE, "cpu", dtype, dtype)
    meta = attention.build(*STEP)
    ids = torch.tensor([11, 3, 250, 7, 9, 100, 42])
    per_op_caches, stack_caches = _caches(model, dtype), _caches(model, dtype)
    with torch.inference_mode():
        want = model(ids, meta.positions, meta, per_op_caches)
        model.stack = FusedDecoder.build(model, attention, stack_caches)
        assert model.stack.serves(len(ids), meta, stack_caches)
        assert not model.stack.serves(len(ids), meta, per_op_caches)  # not the caches it holds
        got = model(ids, meta.positions, meta, stack_caches)
    assert got.dtype == dtype and torch.equal(got, want)
    for (k_want, v_want), (k_got, v_got) in zip(per_op_caches, stack_caches):
        assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)


@pytest.mark.parametrize("kind", ["llama_tied", "qwen2", "mistral_yarn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_call_equals_the_model_op_by_op_bit_for_bit(tmp_path_factory, kind, dtype):
    """On the build that serves here (qwen2: q/k/v biases; mistral_yarn: scaled rotary
    tables); every build this CPU runs: test_cpu_build."""
    assert_one_call_is_op_by_op(_model(tmp_path_factory, kind, dtype), dtype)


def test_a_slot_past_the_cache_is_refused_before_any_write(tmp_path_factory):
    model = _model(tmp_path_factory, "llama_tied", torch.float32)
    attention = attention_backend("torch", BLOCK_SIZE, "cpu", torch.float32, torch.float32)
    caches = _caches(model, torch.float32)
    before = [k.clone() for k, _ in caches]
    fused = FusedDecoder.build(model, attention, caches)
    meta = attention.build([[NUM_BLOCKS + 3]], [0], [1])  # a block the cache does not have
    with torch.inference_mode(), pytest.raises(IndexError, match="a slot is past the cache"):
        fused(torch.tensor([5]), meta.positions, meta)
    assert all(torch.equal(k, b) for (k, _), b in zip(caches, before))


def test_inputs_that_do_not_describe_one_step_are_refused(tmp_path_factory):
    model = _model(tmp_path_factory, "llama_tied", torch.float32)
    attention = attention_backend("torch", BLOCK_SIZE, "cpu", torch.float32, torch.float32)
    fused = FusedDecoder.build(model, attention, _caches(model, torch.float32))
    meta = attention.build([[1]], [0], [2])
    stack = fused._stack(2)
    with torch.inference_mode():
        embeddings = model.model.embed_tokens(torch.tensor([5, 6]))
        with pytest.raises(ValueError, match="do not describe one step"):
            stack(embeddings[:1], meta.positions[:1], meta.slot_mapping[:1], meta.batch)
        with pytest.raises(ValueError, match=r"takes \[T, 64\] torch.float32 embeddings"):
            stack(embeddings.bfloat16(), meta.positions, meta.slot_mapping, meta.batch)


def test_weights_of_other_shapes_are_refused_when_the_stack_is_built(tmp_path_factory):
    model = _model(tmp_path_factory, "llama_tied", torch.float32)
    attention = attention_backend("torch", BLOCK_SIZE, "cpu", torch.float32, torch.float32)
    caches = _caches(model, torch.float32)
    layer = model.model.layers[1].self_attn
    layer.o_proj = KernelLinear(torch.randn(64, 32), None)  # takes 32 of the 64 heads' values
    with pytest.raises(ValueError, match="layer 1's o is 64x32, not 64x64"):
        FusedDecoder.build(model, attention, caches)


def test_only_steps_whose_linear_layers_are_all_ours_run_as_one_call(tmp_path_factory):
    """A bucket of rows where one projection is oneDNN's runs op by op; the others in one
    call; the health report says which."""
    model = _model(tmp_path_factory, "llama_tied", torch.float32)
    attention = attention_backend("torch", BLOCK_SIZE, "cpu", torch.float32, torch.float32)
    caches = _caches(model, torch.float32)
    assert FusedDecoder.build(model, attention, caches).describe() == "one call per step"
    mlp = model.model.layers[1].mlp
    ours = mlp.down_proj
    assert isinstance(ours, KernelLinear)
    weight = torch.randn(ours.out_features, ours.in_features)
    mlp.down_proj = BucketedLinear([(32, ours), (None, OneDnnLinear(weight, None))])
    model.stack = fused = FusedDecoder.build(model, attention, caches)
    meta = attention.build([[1]], [0], [1])
    assert [fused.serves(rows, meta, caches) for rows in (1, 32, 33)] == [True, True, False]
    assert fused.describe() == "one call per step of <=32 rows, else a call per op"
    assert chosen(model, attention, model.ops)["decoder"] == fused.describe()
    mlp.down_proj = BucketedLinear([(32, OneDnnLinear(weight, None)), (None, ours)])
    fused = FusedDecoder.build(model, attention, caches)
    assert [fused.serves(rows, meta, caches) for rows in (32, 33, 4096)] == [False, True, True]
    assert fused.describe() == "one call per step of >32 rows, else a call per op"


def test_nothing_runs_as_one_call_off_our_kernels(tmp_path_factory, monkeypatch):
    model = _model(tmp_path_factory, "llama_tied", torch.float32)
    caches = _caches(model, torch.float32)
    torch_attention = TorchBackend(BLOCK_SIZE, "cpu", null_block=NUM_BLOCKS)
    assert FusedDecoder.build(model, torch_attention, caches) is None
    assert chosen(model, torch_attention, LayerOps())["decoder"] == "a call per op"
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    unpacked = _model(tmp_path_factory, "llama_tied", torch.float32)  # torch's ops throughout
    attention = attention_backend("torch", BLOCK_SIZE, "cpu", torch.float32, torch.float32)
    assert FusedDecoder.build(unpacked, attention, caches) is None
