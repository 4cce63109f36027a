"""An executor session: what one ready executor lends the scheduler, from its readiness to
its loss. Built whole when the executor is ready, attached to the scheduler, and detached
whole when it is lost; nothing in it outlives the executor (counters the metrics scrape live
with the scheduler instead)."""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.common import protocol as p
from pagedserve.common.config import SchedulerConfig
from pagedserve.common.log import get_logger
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.cost_model import PreemptionCostModel

log = get_logger("scheduler")


@dataclass(frozen=True)
class ContextLimit:
    """The longest context served (max_model_len), and what sets it, for the error of a
    prompt that does not fit: ``"the executor's model serves no more"``, ..."""

    max_model_len: int
    why: str

    def lower(self, max_model_len: int, why: str) -> ContextLimit:
        """This limit, or ``max_model_len`` if that is lower (logged)."""
        if max_model_len >= self.max_model_len:
            return self
        log.warning("max_model_len lowered", max_model_len=max_model_len, reason=why)
        return ContextLimit(max_model_len, why)


@dataclass(frozen=True)
class ExecutorSession:
    """The ready executor's block pools (``block_manager``), what preempting costs on it
    (``cost_model``; None: no measurements, the preemption mode decides) and the longest
    context it serves (``limit``)."""

    block_manager: BlockManager
    limit: ContextLimit
    cost_model: PreemptionCostModel | None = None

    @property
    def max_model_len(self) -> int:
        return self.limit.max_model_len

    @classmethod
    def open(cls, config: SchedulerConfig, executor: p.RegisterExecutor, ready: p.ExecutorReady,
             limit: ContextLimit) -> ExecutorSession:
        """The session of an executor that registered as ``executor`` and sized its pools as
        ``ready``; ``limit``: the context agreed at registration."""
        block_manager = BlockManager(config.block_size, ready.num_device_blocks,
                                     ready.num_cpu_blocks, config.watermark,
                                     config.enable_prefix_caching)
        # Every sequence must fit in the pool on its own, or it could never run.
        limit = limit.lower(block_manager.max_seq_len, "the KV pool holds no more")
        cost_model = PreemptionCostModel(executor.kv_bytes_per_token * config.block_size)
        return cls(block_manager, limit, cost_model)
