"""Time a peer engine on a job that ``benchmarks.compare`` wrote: transformers' static batching
or vLLM's offline ``LLM.generate``. Standalone: it runs in the peer's own virtual environment and
imports nothing from pagedserve.

    python benchmarks/peer_run.py --engine vllm|transformers --job job.json --out result.json

The job holds the model directory, dtype, threads and named request sets (prompt token ids,
output length, how many timed runs). Every request is greedy with EOS ignored, so it produces
exactly its output length; the runner checks that. Wall time covers only the generation calls:
model load, compilation and a warm-up are excluded.

transformers, as a server without continuous batching would: requests in arrival order, in
static batches of ``hf_batch_size`` (or the whole set when smaller), each left-padded to its
longest prompt and decoded to its longest output. vLLM: one ``generate`` call with every request
of a set, its prefix cache reset before each timed run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

# Run as a script, this folder is first on sys.path, and it holds kernels.py: transformers 5.25
# and later import Hugging Face's `kernels`, which must not find that file instead.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or ".") != _HERE]


def run_transformers(job: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["dtype"]),
                                                 attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    base = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)

    def generate(requests: list[dict], batch_size: int) -> list[list[int]]:
        outputs = []
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            width = max(len(r["prompt"]) for r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, width - len(r["prompt"]):] = torch.tensor(r["prompt"])
                mask[i, width - len(r["prompt"]):] = 1
            config = copy.deepcopy(base)
            config.max_new_tokens = max(r["output_len"] for r in batch)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            outputs += [out[i, width:width + r["output_len"]].tolist()
                        for i, r in enumerate(batch)]
        return outputs

    generate([{"prompt": list(range(100, 140)), "output_len": 4}], 1)  # warm-up
    results = {name: _timed(lambda reqs=s["requests"]: generate(
        reqs, min(job["hf_batch_size"], len(reqs))), s) for name, s in job["sets"].items()}
    return {"engine": "transformers", "version": transformers.__version__,
            "torch": torch.__version__, "batch_size": job["hf_batch_size"], "results": results}


def run_vllm(job: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job["dtype"], seed=0)

    def generate(requests: list[dict]) -> list[list[int]]:
        llm.reset_prefix_cache()  # repeats must not skip prefill
        prompts = [{"prompt_token_ids": r["prompt"]} for r in requests]
        params = [SamplingParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True)
                  for r in requests]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    generate([{"prompt": list(range(100, 140)), "output_len": 4}])  # warm-up
    results = {name: _timed(lambda reqs=s["requests"]: generate(reqs), s)
               for name, s in job["sets"].items()}
    config = llm.llm_engine.vllm_config
    return {"engine": "vllm", "version": vllm.__version__, "torch": torch.__version__,
            "block_size": config.cache_config.block_size, "results": results}


def _timed(generate, request_set: dict) -> dict:
    requests = request_set["requests"]
    walls = []
    for _ in range(request_set["repeats"]):
        start = time.perf_counter()
        outputs = generate()
        walls.append(time.perf_counter() - start)
        got = [len(o) for o in outputs]
        want = [r["output_len"] for r in requests]
        if got != want:
            raise RuntimeError(f"output lengths {got[:8]}... differ from {want[:8]}...")
        print(f"  {len(requests)} requests: {walls[-1]:.1f} s", flush=True)
    return {"runs_s": walls, "median_s": statistics.median(walls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["transformers", "vllm"], required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.job) as f:
        job = json.load(f)
    result = (run_vllm if args.engine == "vllm" else run_transformers)(job)
    result["env"] = {k: os.environ.get(k) for k in (
        "LD_PRELOAD", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
        "VLLM_CPU_NUM_OF_RESERVED_CPU")}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
