"""``--kv-cache-dtype bfloat16`` end to end, real processes: under float32 weights the same
memory holds twice the blocks (the scheduler's pool is sized by the executor's handshake), and
SmolLM2 still answers; the triton backend refuses it with a clear error."""
from __future__ import annotations

import pytest

from pagedserve.common.client import Client
from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc.worker import resolve_kv_dtype
from services import Services

pytestmark = pytest.mark.slow

GIB = 0.05
# SmolLM2: 30 layers x (K, V) x 16 slots x 3 kv heads x 64 dims, float32
FLOAT32_BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4


def test_bfloat16_cache_holds_twice_the_blocks_and_serves(smollm2_dir):
    svc = Services(smollm2_dir, executor_args=["--kv-cache-dtype", "bfloat16",
                                               "--kv-cache-gb", str(GIB)])
    try:
        blocks = svc.pool()["device"]["total"]
        # less the null block the cache adds
        assert blocks == int(GIB * 2**30) // (FLOAT32_BLOCK_BYTES // 2) - 1
        with Client(svc.client, timeout=60.0) as client:
            out = client.generate("The capital of France is",
                                  SamplingParams(temperature=0.0, max_tokens=8))
        assert out.outputs[0].text.startswith(" Paris.")
    finally:
        svc.stop()


def test_a_cache_dtype_the_attention_backend_cannot_read_is_refused():
    import torch

    assert resolve_kv_dtype("auto", torch.float32, "triton") == torch.float32
    assert resolve_kv_dtype("bfloat16", torch.float32, "torch") == torch.bfloat16
    assert resolve_kv_dtype("bfloat16", torch.bfloat16, "triton") == torch.bfloat16
    with pytest.raises(ValueError, match="needs --attention-backend torch"):
        resolve_kv_dtype("bfloat16", torch.float32, "triton")
