"""The scheduler benchmark's plan-size measure: a pure decode step costs a few bytes a sequence;
and its result-processing measure runs requests to their end as the step loop would."""
import pytest

from pagedserve.benchmarks.scheduler import run, run_results


def test_pure_decode_plans_stay_under_12_bytes_per_sequence():
    result = run(num_seqs=256, num_steps=40)
    # (seq_id, 1) as packed int32 is 8 bytes; a block id every 16 steps and the header add
    # the rest.
    assert 8 <= result["plan_bytes_per_seq"] <= 12
    assert result["schedule_encode_ms_median"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_result_processing_finishes_requests_and_admits_the_next(stream):
    # 8 requests of 16 tokens: a prefill step then 15 decode steps each; the 8 that take
    # their place finish at step 31, and the third 8 are mid-way at step 40.
    result = run_results(num_seqs=8, num_steps=40, max_tokens=16, stream=stream)
    assert result["finished"] == 16
    # A message per request per step when streaming, one at the end otherwise.
    assert result["messages"] == (8 * 40 if stream else 16)
    assert result["process_ms_median"] > 0
