"""Rotary position embeddings (RoPE), as transformers computes them for the Llama family."""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedserve.executor_svc.model_config import ModelConfig


class RotaryEmbedding:
    """cos/sin of every position up to ``max_position_embeddings``, built once in float32 exactly as
    transformers' rotary embedding builds them for each step, then looked up by position."""

    def __init__(self, config: ModelConfig, device: torch.device | str):
        if config.rope_type == "default":
            init = LlamaRotaryEmbedding.compute_default_rope_parameters
        else:
            init = ROPE_INIT_FUNCTIONS[config.rope_type]
        inv_freq, scaling = init(config.hf_config)
        if inv_freq.numel() * 2 != config.head_dim:
            raise ValueError(f"RoPE covers {inv_freq.numel() * 2} of {config.head_dim} head dims; "
                             "partial rotary embeddings are not supported")
        positions = torch.arange(config.max_position_embeddings, device=device).float()
        freqs = positions[:, None] * inv_freq.to(device)[None, :]
        self.cos = freqs.cos() * scaling
        self.sin = freqs.sin() * scaling

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos[positions], self.sin[positions]
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)


class StepRope:
    """One step's rotary angles: the fused CPU kernel reads ``table`` at ``positions`` itself;
    the torch path's per-token cos/sin are computed the first time a layer asks."""

    def __init__(self, table: RotaryEmbedding, positions: Tensor, dtype: torch.dtype):
        self.table, self.positions, self.dtype = table, positions, dtype

    @functools.cached_property
    def per_token(self) -> tuple[Tensor, Tensor]:
        """cos and sin ``[T, head_dim]`` of each token, in the activations' dtype."""
        return self.table(self.positions, self.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ([T, heads, head_dim]) by its tokens' angles (rotate-half layout, as HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]
