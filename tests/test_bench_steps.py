"""benchmarks.steps' reading of a profile: the GPU's idle share between a few decode steps."""
import pytest

from pagedserve.benchmarks.steps import device_idle


def test_idle_share_is_the_span_that_no_kernel_or_copy_covers():
    # nested and overlapping intervals count once: busy 10-17, 19-26, 28-30; a span of 20
    intervals = [(10, 14), (11, 12), (13, 17), (19, 25), (28, 30), (24, 26)]
    idle, busy = device_idle(intervals)
    assert busy == 7 + 7 + 2
    assert idle == pytest.approx(4 / 20)


def test_back_to_back_kernels_leave_nothing_idle_and_no_kernels_say_nothing():
    assert device_idle([(0, 5), (5, 9), (9, 10)]) == (0.0, 10)
    assert device_idle([(3, 3)]) == (0.0, 0)
    assert device_idle([]) is None
