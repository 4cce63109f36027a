"""Our paged Llama-family model against transformers' own, on the same checkpoints."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve.common.sampling import SamplingParams
from pagedserve.executor_svc import cpu_kernels
from pagedserve.executor_svc.backends import attention_backend, layer_ops
from pagedserve.executor_svc.backends.cpu import FusedDecoder
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.mirror import SeqState
from pagedserve.executor_svc.model import ModelConfig, load_model
from pagedserve.executor_svc.sampler import Sampler
from tiny_models import TINY_CONFIGS, make_tiny_model

BLOCK_SIZE = 4
PREFILL_CHUNK = 6  # longer prompts are prefilled over several steps, on top of their cached prefix
MAX_NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0).sampler_params()


@dataclass
class Seq:
    tokens: list[int]
    prompt_len: int
    arrival_step: int
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # per computed position


class TinyEngine:
    """What the model runner does each step, reduced to a loop: blocks come from a shuffled free
    list (so tables are not contiguous), every running sequence computes its next chunk, and a
    sequence whose prompt is fully computed gets a greedy token."""

    def __init__(self, model, num_blocks: int = 64, kv_dtype: torch.dtype | None = None,
                 one_call: bool = True):
        self.model = model
        dtype = kv_dtype or model.model.embed_tokens.weight.dtype
        cache = CacheEngine(model.config, BLOCK_SIZE, num_blocks, 0, dtype, "cpu")
        self.kv_caches = cache.kv_caches
        # As the model runner chooses them: the compiled kernels where they serve, the
        # decoder stack in one call of them unless ``one_call`` is False.
        self.attention = attention_backend("torch", BLOCK_SIZE, "cpu", model.dtype, dtype,
                                           cache.null_block)
        model.stack = FusedDecoder.build(model, self.attention, self.kv_caches) if one_call \
            else None
        self.sampler = Sampler(layer_ops(torch.float32, "cpu"))
        for k_cache, v_cache in self.kv_caches:  # a read of an unwritten slot shows up as NaN
            k_cache[:num_blocks].fill_(float("nan"))
            v_cache[:num_blocks].fill_(float("nan"))
        self.free_blocks = list(range(num_blocks))
        random.Random(0).shuffle(self.free_blocks)

    def step(self, batch: list[tuple[Seq, int]]) -> None:
        for seq, n in batch:
            while len(seq.block_table) * BLOCK_SIZE < seq.num_computed + n:
                seq.block_table.append(self.free_blocks.pop())
        seqs, query_lens = [s for s, _ in batch], [n for _, n in batch]
        tables, computed = [s.block_table for s in seqs], [s.num_computed for s in seqs]
        meta = self.attention.build(tables, computed, query_lens)
        input_ids = torch.tensor([t for s, n in batch
                                  for t in s.tokens[s.num_computed:s.num_computed + n]])
        with torch.inference_mode():
            hidden = self.model(input_ids, meta.positions, meta, self.kv_caches)
            logits = self.model.compute_logits(hidden).float()
        greedy = [SeqState(s.tokens, s.block_table, s.num_computed, GREEDY, len(s.tokens))
                  for s in seqs]
        tokens = self.sampler(logits[meta.last_token_indices], greedy,
                              [None] * len(batch)).token_ids
        for (seq, n), rows, token in zip(batch, logits.split(query_lens), tokens.tolist()):
            seq.num_computed += n
            seq.logits.extend(rows)
            if seq.num_computed == len(seq.tokens):
                seq.tokens.append(token)


def serve_greedy(model, prompts: list[list[int]], arrival_steps: list[int],
                 max_new_tokens: int, kv_dtype: torch.dtype | None = None,
                 one_call: bool = True) -> list[Seq]:
    """Serve the prompts as one continuous batch, prompt i joining at step ``arrival_steps[i]``
    (the KV cache in ``kv_dtype``, if not the model's)."""
    seqs = [Seq(list(prompt), len(prompt), step) for prompt, step in zip(prompts, arrival_steps)]
    engine, step = TinyEngine(model, kv_dtype=kv_dtype, one_call=one_call), 0
    while unfinished := [s for s in seqs if len(s.tokens) - s.prompt_len < max_new_tokens]:
        step += 1
        engine.step([(s, min(PREFILL_CHUNK, len(s.tokens) - s.num_computed))
                     for s in unfinished if s.arrival_step <= step])
    return seqs


def hf_greedy(path, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32):
    """transformers' greedy generation of each prompt on its own, and the model that made it."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf.generation_config.eos_token_id = None  # a random model may hit EOS; generate every token
    with torch.inference_mode():
        outputs = [hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                               do_sample=False)[0].tolist() for prompt in prompts]
    return outputs, hf


@pytest.fixture(scope="module", params=[
    (kind, fused) for kind in TINY_CONFIGS
    for fused in ("fused", "fused_bf16_values", "fused_per_op", "unfused")])
def generations(request, tmp_path_factory):
    """Three prompts served together (two from step 1, the longest in two chunks; the third joins
    at step 3 while the others decode), against transformers on each prompt alone. ``fused``:
    through the compiled CPU kernels (the default on CPU), the decoder stack in one call of
    them; with ``bf16_values``, on weights that are all bfloat16 values (as SmolLM2's), which
    the GEMM keeps in bfloat16 panels; ``per_op``, a call per op, as steps the stack does not
    serve run. ``unfused``: through torch operators and oneDNN only, as on machines without a
    C compiler."""
    kind, fused = request.param
    if fused.startswith("fused") and cpu_kernels.load() is None:
        pytest.skip("the CPU kernels did not build here (no C compiler?)")
    path = make_tiny_model(kind, tmp_path_factory.mktemp(kind),
                           bf16_values=fused == "fused_bf16_values")
    rng = random.Random(1)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (5, 11, 7)]
    with pytest.MonkeyPatch.context() as patch:
        if fused == "unfused":
            patch.setattr(cpu_kernels, "load", lambda: None)
        seqs = serve_greedy(load_model(path, torch.float32, "cpu"), prompts, [1, 1, 3],
                            MAX_NEW_TOKENS, one_call=fused != "fused_per_op")
    expected, hf = hf_greedy(path, prompts, MAX_NEW_TOKENS)
    with torch.inference_mode():
        expected_logits = [hf(torch.tensor([s.tokens[:-1]])).logits[0] for s in seqs]
    return seqs, expected, expected_logits


def test_greedy_tokens_identical_to_transformers_generate(generations):
    seqs, expected, _ = generations
    assert [s.tokens for s in seqs] == expected


def test_logits_match_transformers_at_every_position(generations):
    seqs, _, expected_logits = generations
    for seq, expected in zip(seqs, expected_logits):
        torch.testing.assert_close(torch.stack(seq.logits), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama_tied", "qwen2"])
def test_bfloat16_model_on_the_kernels_matches_transformers_bfloat16(kind, tmp_path):
    """A bf16 model (weights, activations and cache) through the compiled kernels end to end,
    against transformers in bf16, prompts and decode steps: the same greedy tokens over a
    short continuation, and logits within what bf16 rounding explains (the kernels round
    less often than torch's operators do: float32 sums, RoPE and SiLU rounded once)."""
    if cpu_kernels.load() is None:
        pytest.skip("the CPU kernels did not build here (no C compiler?)")
    path = make_tiny_model(kind, tmp_path)
    rng = random.Random(2)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (5, 11, 7)]
    model = load_model(path, torch.bfloat16, "cpu")
    engine = TinyEngine(model)
    assert (engine.attention.name, model.ops.name) == ("cpu", "cpu") and model.stack
    seqs = serve_greedy(model, prompts, [1, 1, 3], 4)
    expected, hf = hf_greedy(path, prompts, 4, dtype=torch.bfloat16)
    assert [s.tokens for s in seqs] == expected
    with torch.inference_mode():
        for seq in seqs:
            want = hf(torch.tensor([seq.tokens[:-1]])).logits[0].float()
            torch.testing.assert_close(torch.stack(seq.logits), want, rtol=0, atol=0.1)


@pytest.mark.slow
def test_smollm2_greedy_tokens_identical_to_transformers_generate(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ("The capital of France is", "def fibonacci(n):")
    prompts = [tokenizer(text).input_ids for text in texts]
    model = load_model(smollm2_dir, torch.float32, "cpu")
    seqs = serve_greedy(model, prompts, [1, 2], MAX_NEW_TOKENS)
    assert [s.tokens for s in seqs] == hf_greedy(smollm2_dir, prompts, MAX_NEW_TOKENS)[0]


def test_smollm2_bfloat16_greedy_tokens_identical_to_transformers_bfloat16(smollm2_dir):
    """The half-precision path (bf16 weights and cache, through the compiled kernels where they
    built) against transformers in bf16, prompt and decode steps."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer(text).input_ids for text in ("The capital of France is",
                                                      "Water boils at")]
    seqs = serve_greedy(load_model(smollm2_dir, torch.bfloat16, "cpu"), prompts, [1, 2], 8)
    expected, _ = hf_greedy(smollm2_dir, prompts, 8, dtype=torch.bfloat16)
    assert [s.tokens for s in seqs] == expected
    assert tokenizer.decode(seqs[0].tokens[len(prompts[0]):]).startswith(" Paris.")


@pytest.mark.parametrize("path", ["kernels", "torch"])
def test_smollm2_bfloat16_cache_under_float32_weights(smollm2_dir, path, monkeypatch):
    """--kv-cache-dtype bfloat16: keys and values rounded to bfloat16, all else float32, through
    the CPU kernels and through torch operators. These prompts keep float32's greedy tokens;
    the logits move, but only by what the rounding explains."""
    if path == "kernels" and cpu_kernels.load() is None:
        pytest.skip("the CPU kernels did not build here (no C compiler?)")
    if path == "torch":
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer(text).input_ids for text in ("The capital of France is",
                                                      "def fibonacci(n):")]
    model = load_model(smollm2_dir, torch.float32, "cpu")
    exact = serve_greedy(model, prompts, [1, 2], MAX_NEW_TOKENS)
    rounded = serve_greedy(model, prompts, [1, 2], MAX_NEW_TOKENS, kv_dtype=torch.bfloat16)
    assert [s.tokens for s in rounded] == [s.tokens for s in exact]
    assert tokenizer.decode(rounded[0].tokens[len(prompts[0]):]).startswith(" Paris.")
    moved = max((torch.stack(r.logits) - torch.stack(e.logits)).abs().max().item()
                for r, e in zip(rounded, exact))
    print(f"largest logit change: {moved:.4f}")
    assert 0 < moved < 0.5


def test_bfloat16_logits_close_to_transformers_bfloat16(tmp_path):
    path = make_tiny_model("llama", tmp_path)
    model = load_model(path, torch.bfloat16, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    kv_caches = CacheEngine(model.config, BLOCK_SIZE, 8, 0, torch.bfloat16, "cpu").kv_caches
    tokens = torch.arange(3, 30)
    attention = attention_backend("torch", BLOCK_SIZE, "cpu", torch.bfloat16, torch.bfloat16)
    meta = attention.build([[6, 1, 4, 7, 0, 2, 5]], [0], [len(tokens)])
    with torch.inference_mode():
        logits = model.compute_logits(model(tokens, meta.positions, meta, kv_caches))
        expected = hf(tokens[None]).logits[0].float()
    assert logits.dtype == torch.bfloat16  # as the head rounds them; the sampler widens them
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=0.1)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single = load_model(make_tiny_model("qwen2", tmp_path / "single"), torch.float32, "cpu")
    sharded_path = make_tiny_model("qwen2", tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded_path / "model.safetensors.index.json").exists()
    sharded = load_model(sharded_path, torch.float32, "cpu")
    sharded_state = sharded.state_dict()
    assert single.state_dict().keys() == sharded_state.keys()
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor, sharded_state[name]), name


def test_config_reads_the_checkpoint_shape(tmp_path):
    config = ModelConfig.from_model_dir(make_tiny_model("qwen2", tmp_path))
    shape = (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim)
    assert config.architecture == "Qwen2ForCausalLM" and shape == (2, 4, 2, 16)
    assert config.qkv_bias and not config.o_proj_bias and not config.tie_word_embeddings
    assert config.torch_dtype == torch.float32 and config.max_model_len == 128


def write_config(path, **overrides):
    config = json.loads((make_tiny_model("llama", path) / "config.json").read_text()) | overrides
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unsupported_architecture_is_named(tmp_path):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_head": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelConfig.from_model_dir(tmp_path)


def test_length_dependent_rope_is_rejected(tmp_path):
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    write_config(tmp_path, rope_parameters=dynamic)
    with pytest.raises(ValueError, match="'dynamic'"):
        ModelConfig.from_model_dir(tmp_path)


def test_heads_not_a_multiple_of_kv_heads_is_rejected(tmp_path):
    write_config(tmp_path, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\).*num_key_value_heads \(3\)"):
        ModelConfig.from_model_dir(tmp_path)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    path = make_tiny_model("llama", tmp_path)
    tensors = load_file(path / "model.safetensors")
    rogue = tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.rogue.weight"] = rogue
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                         r"unexpected: model\.layers\.0\.self_attn\.rogue\.weight"):
        load_model(path, torch.float32, "cpu")
