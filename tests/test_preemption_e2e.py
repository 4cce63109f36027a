"""Real processes with a device pool too small for the load: every preemption mode completes
every request with the greedy output of an unconstrained run; prefix caching saves work."""
import pytest

from pagedserve.common.client import Client
from pagedserve.common.sampling import SamplingParams
from services import Services

pytestmark = pytest.mark.slow

PROMPTS = [f"Story number {i}: once upon a time in a land far away," for i in range(10)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)


def run(model, num_device_blocks, *scheduler_args, prompts=PROMPTS, params=PARAMS):
    services = Services(model, scheduler_args=scheduler_args, executor_args=[
        "--num-device-blocks", str(num_device_blocks), "--num-cpu-blocks", "256"])
    try:
        with Client(services.client, timeout=120.0) as client:
            outs = client.generate(prompts, params)
        return [[c.token_ids for c in o.outputs] for o in outs], services.pool()
    finally:
        services.stop()


@pytest.fixture(scope="module")
def unconstrained(smollm2_dir):
    return run(smollm2_dir, 512)[0]


def test_groups_of_samples_and_beams_are_swapped_whole_and_continue_exactly(smollm2_dir):
    # 3 x 2 greedy samples and 2 searches of 3 beams, 64 new tokens each: 12 sequences
    # growing to ~80 tokens (60 blocks unshared) in 40 blocks.
    samples = SamplingParams(n=2, temperature=0.0, max_tokens=64, ignore_eos=True)
    beams = SamplingParams(beam_width=3, max_tokens=64, ignore_eos=True)
    params = [samples] * 3 + [beams] * 2
    prompts = PROMPTS[:5]
    want, _ = run(smollm2_dir, 512, prompts=prompts, params=params)
    got, pool = run(smollm2_dir, 40, "--preemption-mode", "auto", prompts=prompts,
                    params=params)
    assert got == want and all(a == b for a, b in want[:3])  # greedy samples agree
    assert pool["preemptions"]["swap"] > 0
    assert pool["device"]["used"] == 0 and pool["cpu"]["used"] == 0


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_every_mode_completes_every_request_exactly(smollm2_dir, unconstrained, mode):
    # 40 blocks of 16 tokens = 640 slots for 10 sequences that grow to ~110 tokens each
    outputs, pool = run(smollm2_dir, 40, "--preemption-mode", mode)
    assert outputs == unconstrained
    assert sum(pool["preemptions"].values()) > 0
    if mode != "auto":
        assert pool["preemptions"][mode] == sum(pool["preemptions"].values())
    assert pool["device"]["used"] == 0 and pool["cpu"]["used"] == 0
