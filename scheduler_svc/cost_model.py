"""What a preemption costs, learned from the executor's own step timings.

Recompute costs the prefill of every token the group has; swap costs moving its blocks
out and back in. Both rates come from measurements (an exponential moving average), the
swap rate starting from a prior until the first swap is timed.
"""
from __future__ import annotations

PRIOR_SWAP_BYTES_PER_S = 10e9  # host memory copy, each way
MIN_PREFILL_TOKENS = 64        # steps with fewer tokens say little about prefill cost
SMOOTHING = 0.2


class PreemptionCostModel:
    def __init__(self, bytes_per_block: int):
        self.prior_swap_s_per_block = bytes_per_block / PRIOR_SWAP_BYTES_PER_S
        self.swap_s_per_block: float | None = None
        self.prefill_s_per_token: float | None = None

    def observe(self, num_tokens: int, execute_ms: float, blocks_moved: int,
                block_ops_ms: float) -> None:
        """Learn from one acknowledged step."""
        if blocks_moved:
            self.swap_s_per_block = _ema(self.swap_s_per_block,
                                         block_ops_ms / 1e3 / blocks_moved)
        if num_tokens >= MIN_PREFILL_TOKENS:
            per_token = (execute_ms - block_ops_ms) / 1e3 / num_tokens
            self.prefill_s_per_token = _ema(self.prefill_s_per_token, per_token)

    def prefers_swap(self, num_tokens: int, num_blocks: int) -> bool:
        """Is moving ``num_blocks`` out and back cheaper than recomputing ``num_tokens``?"""
        if self.prefill_s_per_token is None:
            return False  # nothing measured yet: recompute needs no CPU memory
        swap_s = 2 * num_blocks * (self.swap_s_per_block or self.prior_swap_s_per_block)
        return swap_s < num_tokens * self.prefill_s_per_token


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
