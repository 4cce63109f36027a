"""The cache engine: the paged KV cache of every layer, on the device and in CPU swap space."""
from __future__ import annotations

import torch
from torch import Tensor

from executor_svc.model import ModelConfig


class CacheEngine:
    """Per layer a K and a V tensor ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    ``kv_caches`` live on the device; ``cpu_caches`` (pinned when the device is CUDA, for async
    copies) hold swapped-out blocks. Both are left uninitialised: a slot is read only after written.
    """

    def __init__(self, model_config: ModelConfig, block_size: int, num_device_blocks: int,
                 num_cpu_blocks: int, dtype: torch.dtype, device: torch.device | str):
        self.device = device = torch.device(device)
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.kv_caches = _allocate(model_config, block_size, num_device_blocks, dtype,
                                   device=device)
        self.cpu_caches = _allocate(model_config, block_size, num_cpu_blocks, dtype,
                                    device=torch.device("cpu"), pin_memory=device.type == "cuda")

    @staticmethod
    def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V."""
        per_layer = block_size * model_config.num_kv_heads * model_config.head_dim * dtype.itemsize
        return 2 * model_config.num_layers * per_layer

    @staticmethod
    def num_blocks_for_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype,
                             num_bytes: int) -> int:
        """How many whole blocks fit in ``num_bytes`` (e.g. ``--kv-cache-gb`` * 2**30)."""
        return int(num_bytes // CacheEngine.bytes_per_block(model_config, block_size, dtype))


def _allocate(config: ModelConfig, block_size: int, num_blocks: int, dtype: torch.dtype,
              **where) -> list[tuple[Tensor, Tensor]]:
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [(torch.empty(shape, dtype=dtype, **where), torch.empty(shape, dtype=dtype, **where))
            for _ in range(config.num_layers)]
