"""Tensor parallelism with real processes over gloo: ranks hold slices of the heads and the MLP,
sum their partial results, and serve transformers' own greedy tokens; the block pool is the
smallest rank's; a rank killed mid-run is handled like an executor crash."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

import services
from pagedserve.common.client import Client
from pagedserve.common.config import ExecutorConfig
from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.model import ModelConfig
from services import Services, admin, child, free_ports, pagedserve, wait_ready
from tiny_models import transformers_greedy

pytestmark = pytest.mark.slow

# 8 query heads, 4 KV heads (head_dim 8): two ranks hold 4 and 2 each
SHAPE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=128, max_position_embeddings=256)
PROMPTS = [[17, 301, 44, 9, 250, 88, 7], [5, 6, 7, 8], list(range(100, 140)), [311] * 19]
MAX_TOKENS = 24
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def tiny_model(config, path, smollm2_dir):
    """A random model of ``config`` with norms and biases away from their defaults, and
    SmolLM2's tokenizer (the prompts are token ids below the tiny vocabulary)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def llama(smollm2_dir, tmp_path_factory):
    path = tiny_model(LlamaConfig(**SHAPE), tmp_path_factory.mktemp("tp-llama"), smollm2_dir)
    return path, transformers_greedy(path, PROMPTS, MAX_TOKENS)


def generate(address, prompts, params=PARAMS):
    with Client(address, timeout=120.0) as client:
        return [out.outputs[0].token_ids for out in client.generate(prompts, params)]


def test_heads_that_do_not_divide_are_a_clear_error_naming_the_numbers(smollm2_dir):
    config = ModelConfig.from_model_dir(smollm2_dir)  # 9 heads, 3 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide.*"
                                         r"num_attention_heads \(9\).*9 attention heads and 3 KV"):
        config.sharded(2)
    assert config.sharded(3).num_heads == 3 and config.sharded(3).num_kv_heads == 1
    with pytest.raises(ValueError, match="tp_rank needs tp_master"):
        ExecutorConfig(tensor_parallel_size=2, tp_rank=1)
    with pytest.raises(ValueError, match=r"tp_rank 2 is outside \[0, 2\)"):
        ExecutorConfig(tensor_parallel_size=2, tp_rank=2, tp_master="127.0.0.1:1")
    proc = pagedserve("executor", "--model", str(smollm2_dir), "--tensor-parallel-size", "2",
                      stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and b"does not divide the model's num_attention_heads (9)" in err


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_two_ranks_give_the_transformers_greedy_tokens(kind, llama, smollm2_dir,
                                                       tmp_path_factory):
    """TP=2: q/k/v and gate/up split by rows, o_proj and down_proj by columns and summed,
    the KV cache split by heads. Qwen2's q/k/v biases are split with their rows."""
    if kind == "llama":
        path, want = llama
    else:
        path = tiny_model(Qwen2Config(**SHAPE), tmp_path_factory.mktemp("tp-qwen2"),
                          smollm2_dir)
        want = transformers_greedy(path, PROMPTS, MAX_TOKENS)
    # float32, as transformers' tokens are; --dtype auto times both on a bf16 CPU, and on
    # this tiny model either can win
    svc = Services(path, executor_args=["--tensor-parallel-size", "2", "--kv-cache-gb", "0.01",
                                        "--dtype", "float32"])
    try:
        # each rank caches its own 2 KV heads: a block takes half the bytes, twice as many fit
        half = ModelConfig.from_model_dir(path).sharded(2)
        assert svc.pool()["device"]["total"] == CacheEngine.num_blocks_for_bytes(
            half, 16, torch.float32, int(0.01 * 2**30)) - 1  # less the null block
        assert generate(svc.client, PROMPTS) == want
        # chunked prefill beside decodes, and prefix-cache hits, across the ranks too
        assert generate(svc.client, PROMPTS[2:] * 2) == want[2:] * 2
        assert svc.pool()["device"]["used"] == 0
    finally:
        svc.stop()


def test_ranks_started_one_by_one_serve_from_the_smallest_pool(llama):
    """Ranks started separately with --tp-rank and --tp-master (as on two machines, summing
    through gloo): the scheduler's pool is the smaller of the two ranks' pools."""
    path, want = llama
    client, executor, admin_port, master = free_ports(4)
    scheduler = pagedserve("scheduler", "--model", str(path), "--client-port", str(client),
                           "--executor-port", str(executor), "--admin-port", str(admin_port))
    common = ["executor", "--model", str(path), "--tensor-parallel-size", "2",
              "--tp-master", f"127.0.0.1:{master}", "--dtype", "float32"]
    env = {"OMP_NUM_THREADS": "1", "PAGEDSERVE_TP_SHARED_MEMORY": "0"}  # a core each
    ranks = []
    try:
        ranks += [pagedserve(*common, "--tp-rank", "0", "--num-device-blocks", "300",
                             "--scheduler", f"tcp://127.0.0.1:{executor}", env=env),
                  pagedserve(*common, "--tp-rank", "1", "--num-device-blocks", "120", env=env)]
        wait_ready(f"tcp://127.0.0.1:{admin_port}", [scheduler, *ranks])
        assert admin(f"tcp://127.0.0.1:{admin_port}", "pool")["device"]["total"] == 120
        assert generate(f"tcp://127.0.0.1:{client}", PROMPTS) == want
    finally:
        services.stop_processes([scheduler, *ranks], timeout_s=15)


def test_a_killed_rank_is_handled_like_an_executor_crash(llama, tmp_path):
    """SIGKILL rank 1 mid-run under ``up``: rank 0 fails its next all-reduce and exits, the
    scheduler takes the executor for dead, ``up`` starts it again (both ranks), and every
    request completes with the undisturbed tokens."""
    path, want = llama
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    # A pool sized for the test: the default's gigabytes over this tiny model are a million
    # blocks, whose allocation in both restarted ranks took 8-19 s on a loaded CI machine.
    with services.up(path, tmp_path / "up.log", "--tensor-parallel-size", "2",
                     "--dtype", "float32", "--kv-cache-gb", "0.05") as running:
        want_long = generate(running.client, PROMPTS, long)
        admin(running.admin, "reset_prefix_cache")  # the second run computes everything again
        outputs = {}
        thread = threading.Thread(
            target=lambda: outputs.update(got=generate(running.client, PROMPTS, long)))
        thread.start()
        halfway = admin(running.admin, "stats")["tokens"]["generation"] + 2 * 200
        while admin(running.admin, "stats")["tokens"]["generation"] < halfway:
            time.sleep(0.05)
        rank0 = child(running.proc.pid, "executor")
        os.kill(child(rank0, "--tp-rank"), signal.SIGKILL)
        thread.join(timeout=180)
        health = admin(running.admin, "health")
    assert outputs["got"] == want_long and [t[:MAX_TOKENS] for t in want_long] == want
    assert health["status"] == "ready" and health["executors_lost"] == 1
    assert "the executor exited with code" in running.log.read_text()


def test_three_ranks_serve_smollm2_with_the_transformers_greedy_tokens(smollm2_dir):
    """SmolLM2's 9 heads and 3 KV heads over 3 ranks: 3 query heads and 1 KV head each."""
    prompt = "The capital of France is"
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(prompt)["input_ids"]
    with torch.inference_mode():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
    svc = Services(smollm2_dir, executor_args=["--tensor-parallel-size", "3",
                                               "--kv-cache-gb", "0.25"])
    try:
        with Client(svc.client, timeout=120.0) as client:
            out = client.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))
    finally:
        svc.stop()
    assert out.outputs[0].token_ids == want.tolist()
    assert out.outputs[0].text.startswith(" Paris.\n\nThe answer is:")
