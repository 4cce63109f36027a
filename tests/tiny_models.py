"""Tiny random HF checkpoints of every supported architecture, written with transformers itself."""
from __future__ import annotations

from pathlib import Path

import tokenizers
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512, max_position_embeddings=128)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
YARN_ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                 original_max_position_embeddings=32)
MHA = dict(num_key_value_heads=SHAPE["num_attention_heads"])

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "llama_tied": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=True),  # SmolLM2's layout
    "llama_mha_llama3_rope": lambda: LlamaConfig(**SHAPE | MHA, rope_parameters=LLAMA3_ROPE),
    "qwen2": lambda: Qwen2Config(**SHAPE),  # q/k/v projections carry a bias
    "mistral_yarn": lambda: MistralConfig(**SHAPE, rope_parameters=YARN_ROPE),
    # head_dim 64, a size the Triton kernels are built for (the others have 16)
    "llama_hd64": lambda: LlamaConfig(**SHAPE | dict(hidden_size=256)),
}


def make_tiny_model(kind: str, path: Path, seed: int = 0, max_shard_size: str = "50GB",
                    bf16_values: bool = False) -> Path:
    """Save a randomly initialised ``kind`` model (float32 safetensors, in shards of at most
    ``max_shard_size``) to ``path``; return it.

    Every parameter is drawn afresh, norms around 1 and biases too, so that a weight loaded into
    the wrong place changes the outputs. ``bf16_values`` rounds each to a bfloat16 value (still
    saved as float32), as a bf16 checkpoint upcast is.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind](), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.1)
            if bf16_values:
                param.copy_(param.bfloat16())
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    return path


def word_tokenizer(eos_token_ids=()):
    """A tokenizer for the tiny models' 512 ids: id i is the word "t<i>"."""
    from pagedserve.scheduler_svc.tokenizer import Tokenizer

    vocab = {f"t{i}": i for i in range(SHAPE["vocab_size"])}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(inner, set(eos_token_ids))


def transformers_greedy(path: Path, prompts: list[list[int]], max_tokens: int,
                        **generate_kwargs) -> list[list[int]]:
    """transformers' own greedy continuation of each prompt by the model at ``path``
    (float32), exactly ``max_tokens`` tokens: EOS does not stop it. ``generate_kwargs``
    go to ``generate`` (its logits processors)."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    out = []
    for ids in prompts:
        with torch.inference_mode():
            tokens = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 min_new_tokens=max_tokens, **generate_kwargs)
        out.append(tokens[0, len(ids):].tolist())
    return out
