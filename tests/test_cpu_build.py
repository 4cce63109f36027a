"""The CPU kernels are built once per instruction set and the widest the CPU runs is chosen;
every build compiles here, and every build this CPU can run computes what the float64
references do, on float32 and on bfloat16 activations (the forced selection a machine without
the wider units still tests)."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from pagedserve.executor_svc import cpu_build, cpu_kernels
from pagedserve.executor_svc.backends.cpu import CpuBackend
from pagedserve.kernels import bf16_attention_tolerance
from pagedserve.executor_svc.cpu_build import ISAS, choose
from pagedserve.executor_svc.cpu_features import CpuInfo, cpu_info
from pagedserve.executor_svc.model import load_model
from test_decoder_stack import assert_one_call_is_op_by_op
from tiny_models import make_tiny_model

ZEN3 = CpuInfo("AMD EPYC", ("avx2", "fma"))
ZEN4 = CpuInfo("AMD EPYC 9R14", ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                 "avx512_vnni", "avx512_bf16"))
SAPPHIRE_RAPIDS = CpuInfo("Intel Xeon", ZEN4.extensions + ("amx_tile", "amx_bf16", "amx_int8"))
SKYLAKE = CpuInfo("Intel Xeon", ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"))
OLD = CpuInfo("Old", ())
BUILDS = {isa.name: isa for isa in ISAS}
compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler here")


@pytest.mark.parametrize("cpu,widest", [(SAPPHIRE_RAPIDS, "amx"), (ZEN4, "avx512_bf16"),
                                        (SKYLAKE, "avx512"), (ZEN3, "avx2"), (OLD, "generic")])
def test_the_widest_build_the_cpu_runs_is_tried_first_then_the_narrower(cpu, widest):
    order = [isa.name for isa in choose(cpu)]
    assert order[0] == widest and order[-1] == "generic"
    assert order == [name for name in BUILDS if name in order]  # widest first


def test_a_forced_build_runs_alone_and_one_the_cpu_lacks_is_refused_by_name():
    assert [isa.name for isa in choose(ZEN4, "avx2")] == ["avx2"]
    with pytest.raises(ValueError, match="cannot run it; it runs avx2, generic"):
        choose(ZEN3, "avx512")
    with pytest.raises(ValueError, match="expected one of amx, avx512_bf16, avx512, avx2, generic"):
        choose(ZEN3, "sse9")


@compiler
def test_a_cache_that_cannot_be_written_builds_in_a_temporary_folder(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(cpu_build, "cache_dir", lambda: tmp_path / "a-file" / "cache")
    monkeypatch.setattr(cpu_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.delenv("PAGEDSERVE_KERNELS_DIR", raising=False)
    path = cpu_build._find_or_build(BUILDS["generic"])
    assert path.parent.parent == tmp_path / "tmp"


def test_without_a_compiler_the_reason_is_kept_for_health(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PAGEDSERVE_KERNELS_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(cpu_build, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(cpu_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu_build.load.cache_clear()
    try:
        loaded = cpu_build.load()
    finally:
        cpu_build.load.cache_clear()
    assert loaded.library is None and loaded.status.startswith("not built: ")
    assert "no-such-cc" in loaded.status


def runnable_builds():
    """(name, extra flags) of every build this CPU runs, and the 16-float GEMM tile built
    with AVX2 where AVX-512 is missing, so its code is tested here too (at -O1: GCC takes
    minutes to optimise 16-float vectors it must split in two)."""
    names = [isa.name for isa in cpu_build.candidates(cpu_info())]
    wide = [] if "avx512" in names or "avx2" not in names else [("avx2", ("-DGEMM_VW=16", "-O1"))]
    return [(name, ()) for name in names] + wide


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each build's library, made once for the module."""
    folder, paths = tmp_path_factory.mktemp("builds"), {}

    def get(name: str, flags: tuple[str, ...]):
        if (name, flags) not in paths:
            try:
                paths[name, flags] = cpu_build.build(BUILDS[name], folder, flags)
            except subprocess.CalledProcessError as exc:
                pytest.fail(f"{name} did not build: {exc.stderr}")
        return paths[name, flags]
    return get


@compiler
def test_every_build_compiles_even_those_this_cpu_cannot_run(built):
    paths = [built(isa.name, ()) for isa in ISAS]
    assert all(path.is_file() and isa.name in path.name for isa, path in zip(ISAS, paths))
    before = paths[-1].stat().st_mtime_ns  # keyed by sources and flags: found, not rebuilt
    assert cpu_build.build(ISAS[-1], paths[-1].parent).stat().st_mtime_ns == before


@pytest.fixture(params=runnable_builds(), ids=lambda b: b[0] + "".join(b[1]))
def build(request, built, monkeypatch):
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here")
    lib = cpu_kernels.declare(ctypes.CDLL(str(built(*request.param))))
    monkeypatch.setattr(cpu_kernels, "load", lambda: lib)
    return lib


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype: torch.dtype, roundings: int = 1) -> dict[str, float]:
    """float32 sums; in bfloat16 also each rounding of the output, 2^-8 of it at most."""
    rtol = 1e-5 + (roundings * 2 ** -8 if dtype == torch.bfloat16 else 0)
    return dict(rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 7, 13, 32, 33, 150])
@pytest.mark.parametrize("in_features,out_features", [(5, 17), (385, 49), (576, 192)])
@pytest.mark.parametrize("model", ["float32", "float32 bf16 values", "bfloat16"])
def test_each_build_s_gemm_matches_float64(build, tokens, in_features, out_features, model):
    dtype = torch.bfloat16 if model == "bfloat16" else torch.float32
    weight = randn(out_features, in_features, seed=1, dtype=dtype)
    bias = randn(out_features, seed=2, dtype=dtype)
    if model == "float32 bf16 values":
        weight = weight.bfloat16().float()
    x = randn(tokens, in_features, dtype=dtype)
    expected = x.double() @ weight.double().T + bias.double()
    linear = cpu_kernels.PackedWeight(weight, bias)
    out = linear(x, torch.float32)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32))
    assert torch.equal(linear(x), out.to(dtype))  # bfloat16 out: those sums, rounded
    assert cpu_kernels.PackedWeight(weight, None).panels.shape[-1] == build.gemm_columns()
    # a row's sums do not depend on the rows beside it (in bf16 a token's hidden state must
    # not depend on the step that computed it): the last row alone, bit for bit
    assert torch.equal(linear(x[-1:].contiguous(), torch.float32)[0], out[-1])


@pytest.mark.parametrize("tokens", [1, 13, 150])
# 64: whole panels of gate and up in every build, in one pass; 48 in the 8-float builds only
@pytest.mark.parametrize("inter", [64, 48])
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_build_s_gate_up_projection_with_silu_mul_is_the_two_calls_bit_for_bit(
        build, tokens, inter, dtype):
    x = randn(tokens, 96, dtype=dtype)
    layer = cpu_kernels.PackedWeight(randn(2 * inter, 96, seed=1, dtype=dtype),
                                     randn(2 * inter, seed=2, dtype=dtype))
    assert torch.equal(layer.silu_mul(x), cpu_kernels.silu_mul(layer(x)))


def test_a_bf16_model_s_gemm_runs_on_bf16_dot_products_in_the_bf16_builds_only(
        request, build):
    name, flags = request.node.callspec.params["build"]
    # the same compiler condition as attention's dot products (GCC 12 or clang)
    assert build.gemm_bf16_products() == (name in ("amx", "avx512_bf16")
                                          and build.attention_bf16_products())
    assert build.gemm_bf16_pairs() == (build.gemm_columns() == 32)  # 16-float vectors
    # on AMX tiles in the amx build, which this CPU runs only where the OS lends them
    assert build.gemm_amx() == (name == "amx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_build_s_layer_ops_match_float64(build, dtype):
    residual, x = randn(5, 40, seed=3, dtype=dtype), randn(5, 40, seed=4, dtype=dtype)
    weight = randn(40, seed=5, dtype=dtype)
    before = residual.clone()
    norm = cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, before + x)  # the sum written back, rounded as torch's
    total = residual.double()
    expected = weight.double() * total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm.double(), expected, **tolerance(dtype, roundings=2))
    gate_up = randn(3, 2 * 20, seed=6, dtype=dtype)
    gate, up = gate_up.double().chunk(2, -1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up).double(),
                               gate * torch.sigmoid(gate) * up, **tolerance(dtype))
    logits = randn(4, 1000, seed=7, dtype=dtype)
    token_ids, logprobs = cpu_kernels.greedy(logits)
    assert torch.equal(token_ids, logits.argmax(-1))
    torch.testing.assert_close(
        logprobs.double(), torch.log_softmax(logits.double(), -1).max(-1).values,
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_build_s_paged_attention_matches_float64(build, dtype):
    """Queries and cache of one dtype, as a model with that dtype's cache has them."""
    block_size, heads, kv_heads, head_dim, context = 16, 4, 2, 64, 37
    k_cache = randn(8, block_size, kv_heads, head_dim, seed=8, dtype=dtype)
    v_cache = randn(8, block_size, kv_heads, head_dim, seed=9, dtype=dtype)
    table = torch.tensor([[5, 2, 7]])
    query = randn(1, heads, head_dim, seed=10, dtype=dtype)
    batch = cpu_kernels.attention_batch(table, torch.tensor([0, 1]), torch.tensor([context]))
    # the same values, as this build keeps them for the model (pair layout with bf16 products)
    kept = CpuBackend(block_size).from_rows(k_cache, v_cache, dtype)
    assert (kept[0] is k_cache) != (dtype == torch.bfloat16 and build.attention_bf16_products())
    out = cpu_kernels.paged_attention(query, *kept, batch, head_dim ** -0.5)
    assert out.dtype == dtype
    keys = k_cache[table[0]].reshape(-1, kv_heads, head_dim)[:context].double()
    values = v_cache[table[0]].reshape(-1, kv_heads, head_dim)[:context].double()
    keys, values = (t.repeat_interleave(heads // kv_heads, 1) for t in (keys, values))
    scores = torch.einsum("hd,thd->ht", query[0].double(), keys) * head_dim ** -0.5
    expected = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
    if dtype == torch.bfloat16 and build.attention_bf16_products():
        bound = bf16_attention_tolerance(
            torch.einsum("ht,thd->hd", scores.softmax(-1), values.abs()), expected)
        assert ((out[0].double() - expected).abs() <= bound).all()
        # and not merely within it: as close as a float32 attention where the rounding of
        # the probabilities cannot show (a query that sees one token only)
        one = cpu_kernels.paged_attention(query, *kept, cpu_kernels.attention_batch(
            table, torch.tensor([0, 1]), torch.tensor([1])), head_dim ** -0.5)
        torch.testing.assert_close(one[0].double(), values[0], **tolerance(dtype))
    else:
        torch.testing.assert_close(out[0].double(), expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (20, 1)])
def test_each_build_s_attention_gives_a_token_the_same_output_in_a_prompt_as_in_a_decode_step(
        build, dtype, heads, kv_heads):
    """A recomputed sequence (preemption, a replaced executor) must get back the hidden
    states it had: a token's attention in a prompt's chunk and as a decode row, bit for bit.
    20 query heads of one kv head: more than a tile's 16 vectors (AMX)."""
    block_size, head_dim, context, chunk = 16, 64, 83, 45
    k_cache = randn(8, block_size, kv_heads, head_dim, seed=11, dtype=dtype)
    v_cache = randn(8, block_size, kv_heads, head_dim, seed=12, dtype=dtype)
    kept = CpuBackend(block_size).from_rows(k_cache, v_cache, dtype)
    table = torch.tensor([[3, 0, 6, 1, 7, 2]])
    query = randn(chunk, heads, head_dim, seed=13, dtype=dtype)
    prompt = cpu_kernels.paged_attention(query, *kept, cpu_kernels.attention_batch(
        table, torch.tensor([0, chunk]), torch.tensor([context])), head_dim ** -0.5)
    for row in (0, 1, 15, 16, 17, 31, chunk - 1):  # about the tiles' and spans' edges
        one = cpu_kernels.paged_attention(query[row:row + 1], *kept, cpu_kernels.attention_batch(
            table, torch.tensor([0, 1]), torch.tensor([context - chunk + row + 1])),
            head_dim ** -0.5)
        assert torch.equal(one[0], prompt[row]), row


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_build_s_decoder_stack_is_its_ops_one_by_one(build, dtype, tmp_path):
    """decoder.c in each build: the same hidden states and cache writes as that build's
    kernels called one at a time, bit for bit."""
    model = load_model(make_tiny_model("qwen2", tmp_path), dtype, "cpu")
    assert_one_call_is_op_by_op(model, dtype)
