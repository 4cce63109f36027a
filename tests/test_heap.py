"""A service's start-up heap is frozen out of the collector; what it makes later is not."""
import gc
import weakref

import pytest

from pagedserve.common.heap import freeze_startup_heap


class Node:
    def __init__(self):
        self.self = self  # a reference cycle: only the collector frees it


@pytest.fixture
def frozen():
    freeze_startup_heap()
    yield
    gc.unfreeze()


def test_startup_objects_leave_the_collected_generations(frozen):
    assert gc.get_freeze_count() > 1000
    assert sum(gc.get_count()) < 100


def test_a_cycle_made_after_start_up_is_still_collected(frozen):
    node = Node()
    alive = weakref.ref(node)
    del node
    gc.collect()
    assert alive() is None
