"""The cache engine: KV tensors per layer, on the device and in CPU swap space, and their sizing."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import pytest
import torch
from transformers import LlamaConfig

from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.model import ModelConfig


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


def _resident_share(tensor: torch.Tensor) -> float:
    """The share of ``tensor``'s whole pages that are in memory (``mincore``): exact for the
    tensor, whatever the rest of the process allocates or frees meanwhile."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-tensor.data_ptr() // page) * page
    pages = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - start) // page
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(start, pages * page, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(byte & 1 for byte in vec.raw) / pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore as Linux has it")
def test_cpu_device_pool_is_mapped_at_start(config):
    # 40 MiB per tensor: above glibc's largest mmap threshold, so in a fresh process each is
    # a new mapping whose pages are in memory only once written. (Whether the swap pool's are
    # depends on what the process freed before: it may reuse memory that is resident already.)
    blocks = (40 << 20) // (16 * 2 * 16 * 4)
    cache = CacheEngine(config, block_size=16, num_device_blocks=blocks, num_cpu_blocks=0,
                        dtype=torch.float32, device="cpu")
    for k_cache, v_cache in cache.kv_caches:
        assert _resident_share(k_cache) == _resident_share(v_cache) == 1.0
    assert not cache.kv_caches[0][0].any()
