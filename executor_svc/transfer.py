"""Host-to-device copies that leave the host free: a copy from pageable memory makes the host
wait until every kernel queued before it has run, which would stall a step launched ahead of
the one in flight (``model_runner``) behind it."""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; on CUDA through pinned memory, asynchronously."""
    if device.type == "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
