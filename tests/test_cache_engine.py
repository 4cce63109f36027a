"""The cache engine: KV tensors per layer, on the device and in CPU swap space, and their sizing."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig

from executor_svc.cache_engine import CacheEngine
from executor_svc.model import ModelConfig


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ModelConfig:
    path = tmp_path_factory.mktemp("config")
    LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return ModelConfig.from_model_dir(path)


def test_every_layer_has_a_k_and_a_v_tensor_of_blocks(config):
    cache = CacheEngine(config, block_size=16, num_device_blocks=10, num_cpu_blocks=4,
                        dtype=torch.bfloat16, device="cpu")
    assert len(cache.kv_caches) == len(cache.cpu_caches) == 3
    assert cache.null_block == 10
    for (k, v), (cpu_k, cpu_v) in zip(cache.kv_caches, cache.cpu_caches):
        assert k.shape == v.shape == (11, 16, 2, 16)  # and the null block
        assert not k[cache.null_block].any() and not v[cache.null_block].any()
        assert cpu_k.shape == cpu_v.shape == (4, 16, 2, 16)
        assert {t.dtype for t in (k, v, cpu_k, cpu_v)} == {torch.bfloat16}
        assert cpu_k.device.type == "cpu" and not cpu_k.is_pinned()
        assert k.data_ptr() != v.data_ptr()


def test_bytes_per_block_counts_k_and_v_of_every_layer(config):
    # 2 (K and V) * 3 layers * 16 slots * 2 kv heads * 16 head dims * 2 bytes
    assert CacheEngine.bytes_per_block(config, 16, torch.bfloat16) == 2 * 3 * 16 * 2 * 16 * 2
    assert CacheEngine.bytes_per_block(config, 16, torch.float32) == 2 * 3 * 16 * 2 * 16 * 4


def test_num_blocks_for_bytes_rounds_down_to_whole_blocks(config):
    per_block = CacheEngine.bytes_per_block(config, 16, torch.bfloat16)
    assert CacheEngine.num_blocks_for_bytes(config, 16, torch.bfloat16, 10 * per_block) == 10
    assert CacheEngine.num_blocks_for_bytes(config, 16, torch.bfloat16, 11 * per_block - 1) == 10
    assert CacheEngine.num_blocks_for_bytes(config, 16, torch.bfloat16, per_block - 1) == 0


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_cpu_device_pool_is_mapped_at_start_and_the_swap_pool_is_not(config):
    # 40 MiB per tensor: above glibc's largest mmap threshold, so each is a fresh mapping
    # whose pages count as resident only once written.
    blocks = (40 << 20) // (16 * 2 * 16 * 4)
    before = _resident_bytes()
    cache = CacheEngine(config, block_size=16, num_device_blocks=blocks, num_cpu_blocks=blocks,
                        dtype=torch.float32, device="cpu")
    grown = _resident_bytes() - before
    device_bytes = sum(t.numel() * t.element_size() for pair in cache.kv_caches for t in pair)
    assert device_bytes * 0.95 <= grown < device_bytes * 1.5  # the swap pool is as large
    assert not cache.kv_caches[0][0].any()
