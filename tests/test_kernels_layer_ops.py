"""The Triton layer kernels (residual add + RMSNorm, SiLU-mul, RoPE with the K/V write, greedy
sampling) against float64 references and against the torch operators they replace.

Without a GPU, conftest.py has the kernels run in triton's interpreter on CPU tensors. The
interpreter rounds float32 to bfloat16 toward zero (a GPU rounds to nearest), so bfloat16 is
held to a tolerance of a few of its steps; float32 and float16 round as on a GPU.
test_kernels_decode.py compiles these kernels for sm_80 and sm_90 with the others.
"""
from __future__ import annotations

import os

import pytest
import torch

from pagedserve.executor_svc.attention import rope_then_write
from pagedserve.executor_svc.layer_ops import LayerOps
from pagedserve.executor_svc.rope import apply_rope
from pagedserve.kernels.layer_ops import add_rms_norm, greedy, rope_write_kv, silu_mul
from pagedserve.kernels.reference import reshape_and_cache_reference

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# relative to each output's largest magnitude: rounding steps of the dtype (bf16: a few,
# the interpreter's truncation included)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOLERANCE)


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def assert_near(got, want, dtype):
    scale = want.abs().max().item() or 1.0
    error = (got.double().cpu() - want.double().cpu()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"error {error} at scale {scale}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_x", [True, False], ids=["add", "norm-only"])
def test_add_rms_norm_matches_the_float64_reference_and_keeps_the_sum(dtype, with_x):
    # 96 values a row: a masked tail in a block of 128
    x, residual, weight = rand(7, 96, dtype=dtype, seed=1), rand(7, 96, dtype=dtype, seed=2), \
        rand(96, dtype=dtype, seed=3)
    total = residual.double() + x.double() if with_x else residual.double()
    want = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    kept = residual.clone()
    out = add_rms_norm(x if with_x else None, kept, weight, 1e-5)
    assert out.dtype == dtype and out.shape == (7, 96)
    assert_near(out, want, dtype)
    if dtype != torch.bfloat16:  # the sum rounded once to the dtype, as torch's add
        assert torch.equal(kept, residual + x if with_x else residual)
    else:
        assert_near(kept, total, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_float64_reference(dtype):
    gate_up = rand(5, 2 * 1100, dtype=dtype, seed=4)  # two column blocks, the second masked
    gate, up = gate_up.double().chunk(2, -1)
    out = silu_mul(gate_up)
    assert out.shape == (5, 1100) and out.dtype == dtype
    assert_near(out, torch.nn.functional.silu(gate) * up, dtype)


def test_float32_kernels_agree_with_the_torch_operators():
    ops = LayerOps()
    x, residual, weight = (rand(6, 64, dtype=torch.float32, seed=s) for s in (5, 6, 7))
    want, want_sum = ops.add_rms_norm(x, residual.clone(), weight[0], 1e-6)
    kept = residual.clone()
    torch.testing.assert_close(add_rms_norm(x, kept, weight[0], 1e-6), want, rtol=1e-6,
                               atol=1e-6)
    assert torch.equal(kept, want_sum)
    gate_up = rand(6, 128, dtype=torch.float32, seed=8)
    torch.testing.assert_close(silu_mul(gate_up), ops.silu_mul(gate_up), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_argmax_and_its_logprob_in_one_pass(dtype):
    # 5000 columns: a chunk of 4096 and a masked tail. Row 0's maximum appears in both chunks
    # (the first wins), row 1's only in the tail, row 2's at column 0.
    logits = rand(3, 5000, dtype=dtype, seed=11).cpu()
    logits[0, [17, 4500]] = 9.0
    logits[1, 4999] = 9.5
    logits[2, 0] = 8.0
    tokens, logprobs = greedy(logits.to(DEVICE))
    assert tokens.tolist() == [17, 4999, 0] and tokens.dtype == torch.int64
    want = torch.log_softmax(logits.double(), -1)[torch.arange(3), tokens.cpu()]
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.cpu().double(), want, rtol=1e-5, atol=1e-5)
    want_tokens, want_logprobs = LayerOps().greedy(logits)
    assert torch.equal(tokens.cpu(), want_tokens)
    torch.testing.assert_close(logprobs.cpu(), want_logprobs, rtol=1e-5, atol=1e-5)


class RopeCase:
    """A step of ``tokens`` tokens over caches of NaN: qkv, angle tables, positions, slots."""

    def __init__(self, num_heads, num_kv_heads, head_dim, dtype, tokens=6, block_size=4,
                 num_blocks=5):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        width = (num_heads + 2 * num_kv_heads) * head_dim
        self.qkv = rand(tokens, width, dtype=dtype, seed=9)
        g = torch.Generator().manual_seed(10)
        angles = torch.rand(40, head_dim // 2, generator=g, dtype=torch.float64) * 6.3
        self.cos, self.sin = (t.float().to(DEVICE) for t in (angles.cos(), angles.sin()))
        self.positions = torch.randint(0, 40, (tokens,), generator=g).to(DEVICE)
        slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
        slots[2] = -1  # a padding token: nothing written
        self.slots = slots.to(DEVICE)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.caches = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
                       for _ in range(2)]

    def run(self):
        return rope_write_kv(self.qkv.clone(), self.num_heads, self.cos, self.sin,
                             self.positions, *self.caches, self.slots)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 80)],
                         ids=["smollm2", "mha-d80"])
def test_rope_write_kv_rotates_and_writes_only_mapped_slots(dtype, num_heads, num_kv_heads,
                                                            head_dim):
    case = RopeCase(num_heads, num_kv_heads, head_dim, dtype)
    q, k, v = case.run()
    exact = case.qkv.double().cpu()
    cos = case.cos.double().cpu()[case.positions.cpu()].repeat(1, 2)
    sin = case.sin.double().cpu()[case.positions.cpu()].repeat(1, 2)
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    want_q, want_k, want_v = (t.unflatten(-1, (-1, head_dim)) for t in exact.split(sizes, -1))
    want_q, want_k = apply_rope(want_q, cos, sin), apply_rope(want_k, cos, sin)
    assert q.shape == (6, num_heads, head_dim) and k.shape == v.shape == (6, num_kv_heads,
                                                                          head_dim)
    assert_near(q, want_q, dtype)
    assert_near(k, want_k, dtype)
    assert torch.equal(v.cpu().double(), want_v)
    want_caches = [torch.full(c.shape, float("nan"), dtype=torch.float64) for c in case.caches]
    reshape_and_cache_reference(k.cpu().double(), v.cpu().double(), *want_caches,
                                case.slots.cpu())
    for got, want in zip(case.caches, want_caches):
        assert torch.equal(got.isnan().cpu(), want.isnan())  # the padding token's slot too
        assert torch.equal(got.cpu().double().nan_to_num(), want.nan_to_num())


def test_float32_rope_write_kv_agrees_with_the_torch_path():
    case = RopeCase(9, 3, 64, torch.float32)
    q, k, v = case.run()
    caches = [torch.full_like(c, float("nan")) for c in case.caches]

    class Angles:  # StepRope's per-token cos/sin, as the torch path reads them
        per_token = tuple(torch.cat((t[case.positions],) * 2, -1) for t in (case.cos, case.sin))

    def write(key, value, k_cache, v_cache, slots):
        reshape_and_cache_reference(key, value, k_cache, v_cache, slots)

    want = rope_then_write(case.qkv.clone(), 9, Angles(), caches, case.slots, write)
    for got, expected in zip((q, k, v), want):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for got, expected in zip(case.caches, caches):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("call, message", [
    (lambda: add_rms_norm(None, torch.zeros(3, 8, device=DEVICE), torch.zeros(9, device=DEVICE),
                          1e-6), r"weight must be torch.float32 \[8\], got torch.float32 \(9,\)"),
    (lambda: add_rms_norm(torch.zeros(2, 8, device=DEVICE), torch.zeros(3, 8, device=DEVICE),
                          torch.zeros(8, device=DEVICE), 1e-6),
     r"x must be torch.float32 \[3, 8\]"),
    (lambda: silu_mul(torch.zeros(3, 7, device=DEVICE)), r"gate_up must be \[T, 2 \* inter\]"),
    (lambda: rope_write_kv(torch.zeros(2, 5 * 16, device=DEVICE), 3, torch.zeros(4, 8),
                           torch.zeros(4, 8), torch.zeros(2, dtype=torch.int64),
                           torch.zeros(3, 4, 1, 16), torch.zeros(3, 4, 1, 16),
                           torch.zeros(3, dtype=torch.int64)),
     r"slot_mapping must be int32 or int64 \[2\]"),
])
def test_layer_kernels_reject_bad_inputs_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()
