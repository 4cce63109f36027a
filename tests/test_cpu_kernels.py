"""The fused elementwise CPU kernels of a decoder layer against float64 references, at widths
that are and are not multiples of their 8-float vectors."""
from __future__ import annotations

import pytest
import torch

from executor_svc import cpu_kernels
from executor_svc.model import RMSNorm, apply_rope

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None,
                                reason="the CPU kernels did not build here (no C compiler?)")


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("tokens", [1, 3, 200])  # 200 x 576 runs on several threads
@pytest.mark.parametrize("hidden", [8, 13, 576])
@pytest.mark.parametrize("with_x", [True, False])
def test_add_rms_norm(tokens, hidden, with_x):
    residual, x = randn(tokens, hidden, scale=3.0), randn(tokens, hidden, seed=1)
    weight, eps = randn(hidden, seed=2), 1e-5
    total = (residual.double() + x.double()) if with_x else residual.double()
    expected = weight.double() * total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    before = residual.clone()
    out = cpu_kernels.add_rms_norm(x if with_x else None, residual, weight, eps)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual, before + x if with_x else before, rtol=0, atol=0)
    norm = RMSNorm(hidden, eps)
    norm.weight.data.copy_(weight)
    torch.testing.assert_close(out, norm(residual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 8), (9, 3, 64), (2, 1, 6)])
def test_rope_write_kv(tokens, heads, kv_heads, head_dim):
    half, num_positions, num_slots = head_dim // 2, 512, 2 * tokens
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
    angles = randn(num_positions, half, seed=1, scale=3.0)
    cos, sin = angles.cos(), angles.sin()
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, num_positions, (tokens,), generator=g)
    slots = torch.randperm(num_slots, generator=g)[:tokens]
    slots[0] = -1  # not stored
    k_cache = torch.full((num_slots // 2, 2, kv_heads, head_dim), float("nan"))
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
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    stored = slots >= 0
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    torch.testing.assert_close(flat_k[slots[stored]], k[stored], rtol=0, atol=0)
    torch.testing.assert_close(flat_v[slots[stored]], v[stored], rtol=0, atol=0)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[stored]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


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
def test_silu_mul(tokens, inter):
    # gates from -100 to 100: exp(-|g|) underflows at one end, sigmoid saturates at the other
    gate_up = randn(tokens, 2 * inter, scale=8.0)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    gate, up = gate_up.double().chunk(2, -1)
    expected = gate * torch.sigmoid(gate) * up
    out = cpu_kernels.silu_mul(gate_up)
    torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("vocab", [1, 7, 8, 13, 49152])
def test_greedy_matches_argmax_and_log_softmax(vocab):
    logits = randn(6, vocab, scale=5.0)
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
