"""The compiled CPU kernels of a decoder layer (elementwise work and the packed GEMM) against
float64 references, at sizes that are and are not multiples of their vectors and tiles, on
float32 and on bfloat16 activations (a bf16 model's: float32 math inside, each output within
the rounding of bfloat16, and the inputs' own roundings, as the sum written back, exactly
torch's)."""
from __future__ import annotations

import pytest
import torch

from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.backends.cpu import CpuBackend
from pagedserve.executor_svc.backends.tuned import batch_invariant
from pagedserve.executor_svc.layer_ops import LayerOps, OneDnnLinear, can_pack
from pagedserve.executor_svc.rope import apply_rope

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None,
                                reason="the CPU kernels did not build here (no C compiler?)")


DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype: torch.dtype, roundings: int = 1) -> dict[str, float]:
    """An output's error: float32 sums, and in bfloat16 each of the kernel's roundings, at
    most half a unit in the last of 8 significant bits, 2^-8 of the value."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=roundings * 2 ** -8, atol=1e-5)


def randn(*shape: int, seed: int = 0, scale: float = 1.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("tokens", [1, 3, 200])  # 200 x 576 runs on several threads
@pytest.mark.parametrize("hidden", [8, 13, 576])
@pytest.mark.parametrize("with_x", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(tokens, hidden, with_x, dtype):
    residual = randn(tokens, hidden, scale=3.0, dtype=dtype)
    x, weight = randn(tokens, hidden, seed=1, dtype=dtype), randn(hidden, seed=2, dtype=dtype)
    eps = 1e-5
    before = residual.clone()
    out = cpu_kernels.add_rms_norm(x if with_x else None, residual, weight, eps)
    assert out.dtype == dtype
    # the sum is written back rounded exactly as torch's add rounds it
    torch.testing.assert_close(residual, before + x if with_x else before, rtol=0, atol=0)
    total = residual.double()
    expected = weight.double() * total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    # the normalised row and its product with the weight are rounded, as torch's operators do
    torch.testing.assert_close(out.double(), expected, **tolerance(dtype, roundings=2))
    # torch rounds at the same two points; where the sums of squares (summed in another order)
    # put the normalised value a unit apart, its product may land a unit further still
    torch_norm, _ = LayerOps().add_rms_norm(None, residual, weight, eps)
    torch.testing.assert_close(out, torch_norm, **tolerance(dtype, roundings=3))


@pytest.mark.parametrize("block_size", [2, 16])
@pytest.mark.parametrize("tokens", [1, 5, 12, 300])  # 12: on threads for the cache writes alone
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 8), (9, 3, 64), (2, 1, 6)])
@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv(tokens, heads, kv_heads, head_dim, kv_dtype, dtype, block_size):
    """Blocks of 16 slots of a bf16 model's bf16 cache of 64-value heads are written in pair
    layout where the build has bf16 dot products: read back in row layout here."""
    half, num_positions = head_dim // 2, 512
    num_slots = -(-2 * tokens // block_size) * block_size
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    angles = randn(num_positions, half, seed=1, scale=3.0)
    cos, sin = angles.cos(), angles.sin()
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, num_positions, (tokens,), generator=g)
    slots = torch.randperm(num_slots, generator=g)[:tokens]
    slots[0] = -1  # not stored
    k_cache = torch.full((num_slots // block_size, block_size, kv_heads, head_dim), float("nan"),
                         dtype=kv_dtype)
    v_cache = k_cache.clone()
    expected = qkv.double().split([heads * head_dim, kv_heads * head_dim,
                                   kv_heads * head_dim], -1)
    per_token = (torch.cat((cos, cos), -1)[positions].double(),
                 torch.cat((sin, sin), -1)[positions].double())
    want_q = apply_rope(expected[0].view(tokens, heads, head_dim), *per_token)
    want_k = apply_rope(expected[1].view(tokens, kv_heads, head_dim), *per_token)
    want_v = expected[2].view(tokens, kv_heads, head_dim)

    q, k, v = cpu_kernels.rope_write_kv(qkv, heads, kv_heads, cos, sin, positions, k_cache,
                                        v_cache, slots)
    for got, want in ((q, want_q), (k, want_k), (v, want_v)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tolerance(dtype))
    stored = slots >= 0
    paired = cpu_kernels.pair_layout(dtype, k_cache)
    assert paired == (dtype == kv_dtype == torch.bfloat16 and head_dim == 64 and
                      block_size == 16 and cpu_kernels.load().attention_bf16_products() == 1)
    rows = CpuBackend(block_size).to_rows(k_cache, v_cache, dtype)
    flat_k, flat_v = rows[0].flatten(0, 1), rows[1].flatten(0, 1)
    # the cache holds the rotated rows, rounded exactly as torch rounds to a bfloat16 cache
    torch.testing.assert_close(flat_k[slots[stored]], k[stored].to(kv_dtype), rtol=0, atol=0)
    torch.testing.assert_close(flat_v[slots[stored]], v[stored].to(kv_dtype), rtol=0, atol=0)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[stored]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


def test_bfloat16_cache_rounds_as_torch_on_ties_and_special_values():
    tie = 2.0 ** -8  # half a bfloat16 ulp at 1: ties go to the even neighbour
    values = torch.tensor([1 + tie, 1 + 3 * tie, -(1 + tie), float("nan"), float("inf"),
                           -float("inf"), 3.4e38, 1e-40, -0.0, 65504.0, 1 + tie + 2 ** -20,
                           2.0 ** -126])
    qkv = torch.zeros(1, 3 * values.numel())
    qkv[0, 2 * values.numel():] = values  # the value head: stored as it is, not rotated
    k_cache = torch.zeros(2, 1, 1, values.numel(), dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    cpu_kernels.rope_write_kv(qkv, 1, 1, torch.ones(4, values.numel() // 2),
                              torch.zeros(4, values.numel() // 2), torch.tensor([0]), k_cache,
                              v_cache, torch.tensor([1]))
    stored, want = v_cache[1, 0, 0], values.bfloat16()
    nan = values.isnan()  # torch's own vectorised and scalar casts give different NaN bits
    assert stored[nan].isnan().all()
    assert torch.equal(stored[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_rope_write_kv_rejects_positions_and_slots_out_of_range():
    qkv, cos = randn(2, 4 * 8), torch.ones(16, 4)
    cache = torch.zeros(4, 2, 1, 8)
    rope_args = (qkv, 2, 1, cos, cos)
    with pytest.raises(IndexError, match="position"):
        cpu_kernels.rope_write_kv(*rope_args, torch.tensor([0, 16]), cache, cache.clone(),
                                  torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="slot"):
        cpu_kernels.rope_write_kv(*rope_args, torch.tensor([0, 1]), cache, cache.clone(),
                                  torch.tensor([0, 8]))
    assert (cache == 0).all()  # nothing was written


@pytest.mark.parametrize("tokens", [1, 4, 100])
@pytest.mark.parametrize("inter", [8, 12, 1536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(tokens, inter, dtype):
    # gates from -100 to 100: exp(-|g|) underflows at one end, sigmoid saturates at the other
    gate_up = randn(tokens, 2 * inter, scale=8.0, dtype=dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    gate, up = gate_up.double().chunk(2, -1)
    expected = gate * torch.sigmoid(gate) * up
    out = cpu_kernels.silu_mul(gate_up)
    assert out.dtype == dtype
    close = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else tolerance(dtype)
    torch.testing.assert_close(out.double(), expected, **close)


# Vectors of 8 or (AVX-512 builds) 16 values, the latter in two chains of 16: a lone last
# vector (48), tails past the last whole one (13, 40, 100).
@pytest.mark.parametrize("vocab", [1, 7, 8, 13, 16, 40, 48, 100, 49152])
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_matches_argmax_and_log_softmax(vocab, dtype):
    logits = randn(6, vocab, scale=5.0, dtype=dtype)
    if vocab > 1:
        logits[1, vocab // 2] = logits[1, vocab - 1] = 1e3  # a tie: the first index wins
        logits[2, : vocab - 1] = float("-inf")  # all mass on the last token
        logits[3, vocab // 3] = float("nan")  # torch.argmax picks the NaN
        logits[4, 0] = logits[4, 1:].max()  # a tie with index 0
    logits[5] = float("-inf")
    token_ids, logprobs = cpu_kernels.greedy(logits)
    want_ids = logits.argmax(-1)
    want = torch.log_softmax(logits.double(), -1).gather(-1, want_ids[:, None]).squeeze(1)
    assert token_ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(logprobs.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


# Row panels of at most 6 (8-float builds) or 12 rows, rows dealt evenly (13: 5, 4, 4);
# chunks of 12 or 6 panels, the last one short (77, 300), shared out by their work.
@pytest.mark.parametrize("tokens", [1, 5, 6, 7, 13, 32, 77, 300])
# k slices of at most 384 (float32 panels) or 768 (bfloat16 panels); on AMX, chunks of as many
# rows as 768 KiB of x holds: 4096 in-features make 300 tokens chunks of 96, 96, 96 and 12.
@pytest.mark.parametrize("in_features,out_features", [(1, 1), (5, 17), (64, 16), (385, 49),
                                                      (576, 960), (1537, 33), (4096, 40)])
# float32: weights that are not bfloat16 values, and (a bf16 checkpoint served in float32)
# weights that are, packed as bfloat16 losslessly; bfloat16: a bf16 model's weights and inputs.
@pytest.mark.parametrize("model", ["float32", "float32 bf16 values", "bfloat16"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(tokens, in_features, out_features, model, with_bias):
    dtype = torch.bfloat16 if model == "bfloat16" else torch.float32
    x = randn(tokens, in_features, dtype=dtype)
    weight = randn(out_features, in_features, seed=1, dtype=dtype)
    if model == "float32 bf16 values":
        weight = weight.bfloat16().float()
    bias = randn(out_features, seed=2, dtype=dtype) if with_bias else None
    linear = cpu_kernels.PackedWeight(weight, bias)
    assert linear.panels.dtype == (torch.float32 if model == "float32" else torch.bfloat16)
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    got = linear(x, torch.float32)
    assert got.shape == (tokens, out_features)
    # float32 sums: each output within a few ulps of the sum of its terms' magnitudes
    magnitude = x.double().abs() @ weight.double().abs().T
    assert ((got.double() - expected).abs() <= 1e-6 * magnitude + 1e-6).all()
    # in the input's dtype by default: bfloat16 outputs are those sums, rounded as torch rounds
    assert torch.equal(linear(x), got.to(dtype))


@pytest.mark.parametrize("tokens", [1, 7, 33, 150, 300])
@pytest.mark.parametrize("inter", [96, 48])  # AMX fuses whole panels of gate and up; not 48
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
# x 30 times larger: gates past exp's clamp at -87 (the fused store's SiLU is 16 lanes wide
# where silu_mul's is 8)
@pytest.mark.parametrize("scale", [1, 30])
def test_a_gate_up_projection_and_silu_mul_in_one_call_are_the_two_bit_for_bit(
        tokens, inter, dtype, with_bias, scale):
    x = randn(tokens, 128, dtype=dtype) * scale
    weight = randn(2 * inter, 128, seed=1, dtype=dtype)
    bias = randn(2 * inter, seed=2, dtype=dtype) if with_bias else None
    layer = cpu_kernels.PackedWeight(weight, bias)
    got = layer.silu_mul(x)
    assert got.dtype == dtype and torch.equal(got, cpu_kernels.silu_mul(layer(x)))


def test_a_bf16_model_s_weight_packed_for_amx_tiles_takes_bfloat16_inputs_only():
    linear = cpu_kernels.PackedWeight(randn(64, 64, seed=1, dtype=torch.bfloat16), None)
    if not linear.amx:
        pytest.skip("the GEMM does not run on AMX tiles here")
    with pytest.raises(ValueError, match="takes bfloat16 inputs"):
        linear(randn(2, 64))
    x = randn(2, 64, dtype=torch.bfloat16)
    wide, out = x.float(), torch.empty(2, 64, dtype=torch.bfloat16)
    # the kernel refuses a float32 x itself too
    assert cpu_kernels.load().linear(wide.data_ptr(), 0, *linear._weight, out.data_ptr(), 1,
                                     2, 64, 64, 1) == -1
    assert cpu_kernels.load().linear(x.data_ptr(), 1, *linear._weight, out.data_ptr(), 1, 2,
                                     64, 64, 1) == 0
    assert torch.equal(out, linear(x))


def test_linear_is_the_same_on_one_thread_and_on_several():
    x, weight = randn(150, 576), randn(3072, 576, seed=1)
    linear = cpu_kernels.PackedWeight(weight, None)
    several = linear(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = linear(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)  # each output is one thread's sum, in one order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implementation", ["ours", "onednn"])
def test_a_linear_row_does_not_depend_on_the_rows_beside_it(dtype, implementation):
    """A token's output is the same alone, first, last or amid others in its step: a step's
    make-up changes with preemption and other requests, its greedy outputs must not."""
    if implementation == "onednn" and not can_pack(dtype):
        pytest.skip(f"oneDNN's packed GEMM does not serve {dtype} here")
    weight = randn(576, 1536, seed=1, dtype=dtype)  # the down projection's shape
    layer = (cpu_kernels.PackedWeight(weight, None) if implementation == "ours"
             else OneDnnLinear(weight, None))
    x = randn(40, 1536, dtype=dtype)
    whole = layer(x)
    same = [torch.equal(layer(x[start:start + rows].contiguous()), whole[start:start + rows])
            for start, rows in [(0, 1), (7, 1), (39, 1), (0, 2), (3, 5), (8, 32), (0, 33)]]
    if implementation == "ours" or dtype == torch.float32:
        assert all(same)
    elif not all(same):  # oneDNN's bf16 GEMM on AMX: the start-up timing's probe sees it too
        assert not batch_invariant(layer, 1536, dtype)


def test_linear_rejects_an_input_that_does_not_fit_its_weight():
    linear = cpu_kernels.PackedWeight(randn(16, 8), None)
    with pytest.raises(ValueError, match="does not fit"):
        linear(randn(2, 9))
    with pytest.raises(ValueError, match="contiguous"):
        linear(randn(8, 2).T)


def test_linear_of_no_tokens():
    linear = cpu_kernels.PackedWeight(randn(16, 8), None)
    assert linear(torch.empty(0, 8)).shape == (0, 16)


def test_paged_attention_rejects_a_batch_it_cannot_read():
    k_cache = randn(4, 16, 2, 8)
    v_cache = randn(4, 16, 2, 8, seed=1)
    query = randn(5, 4, 8)
    tables = torch.tensor([[0, 1], [2, 3]])

    def attend(starts, lens, tables=tables, query=query):
        batch = cpu_kernels.attention_batch(tables, torch.tensor(starts), torch.tensor(lens))
        return cpu_kernels.paged_attention(query, k_cache, v_cache, batch, 0.5)

    assert attend([0, 4, 5], [20, 1]).shape == (5, 4, 8)  # a prompt chunk and a decode row
    with pytest.raises(ValueError, match="not at the 5 query rows"):
        attend([0, 4, 6], [20, 2])
    with pytest.raises(ValueError, match="do not describe one batch"):
        attend([0, 4, 5], [20, 1], tables=tables[:1])
    with pytest.raises(ValueError, match="longer than its context"):
        attend([0, 4, 5], [3, 1])  # four new tokens in a context of three
    with pytest.raises(ValueError, match="longer than its context or table"):
        attend([0, 4, 5], [33, 1])  # past its two blocks of 16


def test_activations_of_two_dtypes_or_another_dtype_are_refused_by_name():
    residual, x = randn(2, 8, dtype=torch.bfloat16), randn(2, 8)
    with pytest.raises(ValueError, match="one dtype for all; got torch.bfloat16, torch.float32"):
        cpu_kernels.add_rms_norm(x, residual, randn(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="got torch.float16"):
        cpu_kernels.silu_mul(randn(2, 8, dtype=torch.float16))
