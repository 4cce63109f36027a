"""The ``triton`` attention backend inside the model: the kernels (in triton's interpreter
without a GPU) give the same greedy tokens as the ``torch`` backend, through the engine with
mixed prefill and decode steps, chunked prefill, prefix caching and parallel samples."""
import os
import random

import pytest
import torch

from pagedserve.executor_svc.backends import attention_backend
from pagedserve.executor_svc.backends.triton import TritonOps
from pagedserve.executor_svc.model import load_model
from pagedserve.executor_svc.cuda_graphs import batch_buckets
from test_engine import BLOCK_SIZE, make_runner, request, run
from tiny_models import make_tiny_model

PROMPT_LENS = [5, 21, 3, 12]
MAX_TOKENS = 6
# Triton runs kernels on CPU tensors only in its interpreter, which conftest chooses when there
# is no GPU; with one, the CPU variants skip.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="triton on CPU tensors needs TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model("llama_hd64", tmp_path_factory.mktemp("llama_hd64"))
    rng = random.Random(5)
    return path, [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]


def greedy(path, prompts, backend, **kwargs):
    requests = [request(ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, n=2)
                for ids in prompts]
    run(path, requests, attention_backend=backend, **kwargs)
    return [[s.output_token_ids for s in r.seqs] for r in requests]


@interpreted
def test_triton_backend_gives_the_torch_backend_tokens(tiny):
    path, prompts = tiny
    # max_batched 16 splits the 21-token prompt into chunks beside decoding sequences
    assert greedy(path, prompts, "triton", max_batched=16) == greedy(path, prompts, "torch")


@interpreted
def test_triton_and_torch_backends_agree_on_a_mixed_step(tiny):
    """One step with a chunk over a cached prefix, a fresh prompt and two decodes: the
    hidden states agree to float32 rounding, with the Triton layer ops (as on CUDA) too."""
    path, _ = tiny
    models = {"torch": load_model(path, torch.float32, torch.device("cpu")),
              "triton": load_model(path, torch.float32, torch.device("cpu"))}
    models["triton+ops"] = load_model(path, torch.float32, torch.device("cpu"), ops=TritonOps())
    assert models["triton+ops"].model.layers[0].mlp.silu_mul.__self__.name == "triton"
    tables = [[3, 7, 1], [0, 5], [6], [2, 4]]
    computed, query_lens = [6, 0, 3, 5], [4, 7, 1, 1]
    ids = torch.randint(3, 512, (sum(query_lens),), generator=torch.Generator().manual_seed(0))
    hidden, written = {}, {}
    for name, model in models.items():
        shape = (9, BLOCK_SIZE, model.config.num_kv_heads, model.config.head_dim)
        torch.manual_seed(1)  # the same "cached" K/V in both runs; block 8 is the null block
        caches = [(torch.randn(shape).index_fill_(0, torch.tensor([8]), 0),
                   torch.randn(shape).index_fill_(0, torch.tensor([8]), 0))
                  for _ in model.model.layers]
        backend = attention_backend(name.split("+")[0], BLOCK_SIZE, "cpu", torch.float32,
                                    torch.float32, null_block=8)
        meta = backend.build(tables, computed, query_lens)
        with torch.inference_mode():
            hidden[name] = model(ids, meta.positions, meta, caches)
        written[name] = torch.stack([t for layer in caches for t in layer])
    for name in ("triton", "triton+ops"):
        torch.testing.assert_close(hidden[name], hidden["torch"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(written[name], written["torch"], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_on_cuda_each_backend_gives_the_cpu_tokens(tiny, backend):
    path, prompts = tiny
    on_cuda = greedy(path, prompts, backend, max_batched=16, device="cuda")
    assert on_cuda == greedy(path, prompts, "torch")


def test_batch_buckets_cover_every_batch_up_to_the_limit():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(256)[-3:] == [240, 248, 256]
    assert batch_buckets(10_000)[-1] == 512


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=interpreted),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device"))])
def test_decode_graphs_give_the_eager_tokens(tiny, device):
    """Pure-decode steps through the graphs' static, padded buffers (captured and replayed on
    CUDA; run eagerly on CPU) give the tokens of the eager torch backend, with parallel
    samples forking and copying blocks, with groups swapped out and back, and with each step
    launched before the one in flight is read back (its tokens put in the graph's input on
    the device)."""
    path, prompts = tiny
    for num_blocks, mode, overlaps in ((64, "recompute", False), (10, "swap", False),
                                       (64, "recompute", True)):
        runner = make_runner(path, num_blocks, 32, "triton", device)
        # 8 sequences at most (run's scheduler): buckets 1, 2, 4 and 8, with padding rows
        runner.use_decode_graphs(max_num_seqs=8, max_model_len=128, capture=device != "cpu")
        counters = []
        tokens = greedy(path, prompts, "triton", max_batched=16, runner=runner, mode=mode,
                        num_blocks=num_blocks, num_cpu_blocks=32, pipelined=overlaps,
                        overlaps=overlaps,
                        on_step=lambda scheduler: counters.append(dict(scheduler.preemptions)))
        assert runner.graphs.steps > 0
        assert (counters[-1]["swap"] > 0) == (mode == "swap")
        assert tokens == greedy(path, prompts, "torch")


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=interpreted),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device"))])
def test_decode_graphs_sample_from_their_own_logits(tiny, device):
    """A graph's step ends in its logits and their greedy tokens: greedy rows take those,
    seeded samples (top-p, min-p) and rows asking for logprobs sample from the logits; both
    as the eager path does, with a chunked prompt's last token decoding beside them (a
    step of one-token rows in which not every row samples)."""
    path, prompts = tiny

    def sample(graphs):
        requests = [request(prompts[0], temperature=0.0, ignore_eos=True, logprobs=2),
                    request(prompts[1], temperature=0.9, top_p=0.8, seed=7, ignore_eos=True),
                    request(prompts[2], temperature=0.0, ignore_eos=True),
                    request(prompts[3], temperature=1.2, min_p=0.05, seed=3, n=2,
                            ignore_eos=True)]
        runner = make_runner(path, 64, 0, "triton", device)
        if graphs:
            runner.use_decode_graphs(max_num_seqs=8, max_model_len=128, capture=device != "cpu")
        run(path, requests, max_batched=6, runner=runner, attention_backend="triton",
            device=device)
        assert (runner.graphs is not None and runner.graphs.steps > 0) == graphs
        return [[(s.output_token_ids, s.cumulative_logprob, s.logprobs) for s in r.seqs]
                for r in requests]

    through_graphs, eager = sample(True), sample(False)
    for graph_seqs, eager_seqs in zip(through_graphs, eager, strict=True):
        for (tokens, cumulative, logprobs), (tokens_e, cumulative_e, logprobs_e) in zip(
                graph_seqs, eager_seqs, strict=True):
            assert tokens == tokens_e
            assert cumulative == pytest.approx(cumulative_e, abs=1e-4)
            assert len(logprobs) == len(logprobs_e)
            for position, position_e in zip(logprobs, logprobs_e):
                assert list(position) == list(position_e)  # token ids, the chosen first
                for (logprob, rank), (logprob_e, rank_e) in zip(position.values(),
                                                                position_e.values()):
                    assert (logprob, rank) == (pytest.approx(logprob_e, abs=1e-4), rank_e)


@pytest.mark.slow
def test_executor_with_triton_attention_serves_smollm2_greedy(smollm2_dir):
    from pagedserve.common.client import Client
    from pagedserve.common.sampling import SamplingParams
    from services import Services

    services = Services(smollm2_dir, executor_args=["--attention-backend", "triton",
                                                    "--num-device-blocks", "64"])
    try:
        with Client(services.client, timeout=120.0) as client:
            out = client.generate("The capital of France is",
                                  SamplingParams(temperature=0.0, max_tokens=6))
        assert out.outputs[0].text == " Paris.\n\nThe answer"
    finally:
        services.stop()
