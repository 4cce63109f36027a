"""The scheduler benchmark's plan-size measure: a pure decode step costs a few bytes a sequence."""
from pagedserve.benchmarks.scheduler import run


def test_pure_decode_plans_stay_under_12_bytes_per_sequence():
    result = run(num_seqs=256, num_steps=40)
    # (seq_id, 1) as packed int32 is 8 bytes; a block id every 16 steps and the header add
    # the rest.
    assert 8 <= result["plan_bytes_per_seq"] <= 12
    assert result["schedule_encode_ms_median"] > 0
