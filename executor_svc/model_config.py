"""The shape of a Llama-family checkpoint (Llama, Mistral, Qwen2, SmolLM), read from its
config.json as transformers reads it, and the checks that our paged model serves it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from pagedserve.executor_svc.parallel import check_divisible

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# RoPE types whose frequencies do not depend on the sequence length, so one table serves all steps.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """The shape of a Llama-family checkpoint, read from config.json as transformers reads it."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    max_position_embeddings: int
    sliding_window: int | None  # None: every layer attends to the whole context
    torch_dtype: torch.dtype  # the dtype the checkpoint was saved in
    rope_type: str
    hf_config: PretrainedConfig = field(repr=False)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Parse and validate ``model_dir/config.json``; an unsupported model is a ValueError."""
        hf = AutoConfig.from_pretrained(model_dir)
        architecture = (getattr(hf, "architectures", None) or ["<none>"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {architecture!r} in {model_dir}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        num_kv_heads = hf.num_key_value_heads or hf.num_attention_heads
        _check_supported(hf, num_kv_heads)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            architecture=architecture,
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            num_heads=hf.num_attention_heads,
            num_kv_heads=num_kv_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
            o_proj_bias=attention_bias,
            max_position_embeddings=hf.max_position_embeddings,
            sliding_window=_sliding_window(hf),
            torch_dtype=_as_dtype(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)),
            rope_type=hf.rope_parameters["rope_type"],
            hf_config=hf,
        )

    def sharded(self, size: int) -> ModelConfig:
        """The shape one of ``size`` tensor-parallel ranks holds: its share of the query
        heads, KV heads and MLP columns (a ``ValueError`` when they do not divide)."""
        check_divisible(self.num_heads, self.num_kv_heads, self.intermediate_size, size)
        return dataclasses.replace(self, num_heads=self.num_heads // size,
                                   num_kv_heads=self.num_kv_heads // size,
                                   intermediate_size=self.intermediate_size // size)

    @property
    def max_model_len(self) -> int:
        """Longest context this model serves exactly: past a sliding window our full attention
        would see tokens the model's own attention does not."""
        window = self.sliding_window or self.max_position_embeddings
        return min(self.max_position_embeddings, window)


def _check_supported(hf: PretrainedConfig, num_kv_heads: int) -> None:
    if hf.num_attention_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads ({hf.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads})")
    if hf.hidden_act != "silu":
        raise ValueError(f"unsupported hidden_act {hf.hidden_act!r}; only 'silu' is supported")
    if getattr(hf, "mlp_bias", False):
        raise ValueError("unsupported mlp_bias=True; only bias-free MLPs are supported")
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r} (its frequencies depend on the "
                         f"sequence length); supported: {', '.join(STATIC_ROPE_TYPES)}")


def _sliding_window(hf: PretrainedConfig) -> int | None:
    # Qwen2 lists which layers slide (none without use_sliding_window); Mistral slides in all.
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(hf, "sliding_window", None)


def _as_dtype(value) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).removeprefix("torch."))
