"""auto preemption chooses by measured cost: recompute tokens vs move blocks out and back."""
import pytest

from pagedserve.scheduler_svc.cost_model import PreemptionCostModel


def test_recomputes_until_prefill_cost_is_measured():
    model = PreemptionCostModel(bytes_per_block=16 * 46080)
    assert not model.prefers_swap(num_tokens=10_000, num_blocks=1)


def test_choice_follows_the_measured_rates():
    model = PreemptionCostModel(bytes_per_block=16 * 46080)
    # 2 ms a token, then 5 ms a block
    model.observe(num_tokens=1000, execute_ms=2000.0, blocks_moved=0, block_ops_ms=0.0)
    model.observe(num_tokens=1, execute_ms=300.0, blocks_moved=10, block_ops_ms=50.0)
    assert model.prefill_s_per_token == pytest.approx(0.002)
    assert model.swap_s_per_block == pytest.approx(0.005)
    assert model.prefers_swap(num_tokens=160, num_blocks=10)      # 0.1 s swap < 0.32 s recompute
    assert not model.prefers_swap(num_tokens=40, num_blocks=10)   # 0.1 s swap > 0.08 s recompute


def test_small_steps_do_not_move_the_prefill_estimate():
    model = PreemptionCostModel(bytes_per_block=1)
    model.observe(num_tokens=8, execute_ms=500.0, blocks_moved=0, block_ops_ms=0.0)
    assert model.prefill_s_per_token is None
