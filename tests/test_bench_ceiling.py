"""pagedserve.benchmarks.ceiling's count of a request's work, against torch's own FLOP counter over
transformers serving the same tokens one at a time from its KV cache."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

from pagedserve.benchmarks.ceiling import model_shape, request_flops, set_flops

CONFIGS = [
    dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
         intermediate_size=96, vocab_size=200),
    # a head_dim that is not hidden / heads, and no grouping
    dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
         head_dim=24, intermediate_size=80, vocab_size=128),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_count_matches_torch_flop_counter(config):
    hf_config = LlamaConfig(**config, attn_implementation="eager")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    tokens = torch.randint(0, config["vocab_size"], (1, 9))
    # transformers renamed past_key_values to cache (argument and output alike)
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = model(tokens[:, :1], use_cache=True)
        for i in range(1, tokens.shape[1]):
            out = model(tokens[:, i:i + 1], use_cache=True, **{cache: getattr(out, cache)})
    # one token fed at a time, each taking a row of logits: as a prompt of 1 token and 9
    # outputs, the last of them never fed back
    want = request_flops(model_shape(hf_config.to_dict()), 1, tokens.shape[1])
    assert counter.get_total_flops() == sum(want.values())


def test_prompt_rows_take_no_lm_head():
    shape = model_shape(dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                             intermediate_size=96, vocab_size=200))
    long_prompt, short_prompt = request_flops(shape, 100, 5), request_flops(shape, 10, 5)
    assert long_prompt["lm_head"] == short_prompt["lm_head"] == 5 * 2 * 64 * 200
    assert long_prompt["linear"] == short_prompt["linear"] * 104 // 14
    assert set_flops(shape, [{"prompt": [1] * 100, "output_len": 5}] * 2) == \
        2 * sum(long_prompt.values())
