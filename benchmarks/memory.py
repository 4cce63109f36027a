"""``pagedserve bench memory``: the paper's memory figures, replayed on the real block manager.

No model runs: which token a sequence samples never changes its block accounting, only how
many tokens it has. Three measurements, each on a seeded synthetic trace:

1. KV slot utilisation at peak load (paper, Fig. 2): a ShareGPT-like trace through the real
   scheduler and block manager, against static contiguous reservation (the paper's Orca
   baselines) simulated on the same trace and the same slot budget.
2. Blocks saved by sharing among parallel samples (Fig. 15): Alpaca-like requests through
   the real scheduler, one prefill forked into n samples that grow with copy-on-write.
   Beam search needs the model's scores: ``pagedserve.benchmarks.beam_memory`` adds its rows.
3. Prefill tokens saved by a shared system prompt (prefix caching).
"""
from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pagedserve.benchmarks.workload import TOKEN_HI, TOKEN_LO
from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.block_manager import BlockManager
from pagedserve.scheduler_svc.block_snapshot import BlockSnapshot
from pagedserve.scheduler_svc.scheduler import Scheduler
from pagedserve.scheduler_svc.sequence import Request, Sequence
from pagedserve.scheduler_svc.session import ContextLimit, ExecutorSession

# The paper's numbers (SOSP'23), printed beside ours as reference, never computed.
PAPER_UTILISATION = {  # Fig. 2: share of KV memory holding token states
    "pagedserve": ("vLLM", 0.963), "static Max": ("Orca (Max)", 0.204),
    "static Pow2": ("Orca (Pow2)", 0.268), "static Oracle": ("Orca (Oracle)", 0.382)}
PAPER_SAVED = {"parallel sampling": (0.061, 0.098),  # Fig. 15, Alpaca: widths 2 to 6
               "beam search": (0.376, 0.552)}
BUSY = 0.9          # a step counts as busy when this share of the slots is allocated
SUFFIX_LENS = (20, 80)  # request-specific tokens behind the shared prefix


@dataclass(frozen=True)
class Dataset:
    """Lognormal prompt and output lengths with a dataset's means (paper, Fig. 11).

    ``sigma`` is our choice. Lengths are clipped to [1, max_model_len], and each output so
    that its request fits max_model_len, which lowers the means a little.
    """

    name: str
    prompt_mean: float
    output_mean: float
    sigma: float


SHAREGPT = Dataset("ShareGPT", 161.31, 337.99, 1.0)
ALPACA = Dataset("Alpaca", 19.31, 58.45, 0.7)


@dataclass(frozen=True)
class TraceRequest:
    prompt_token_ids: list[int]
    output_lens: list[int]  # one per sample


@dataclass(frozen=True)
class MemoryBench:
    """Sizes of the three measurements; the defaults run in seconds on 2 CPU cores."""

    seed: int = 0
    num_requests: int = 1000        # ShareGPT-like trace, all arriving at step 0
    num_blocks: int = 2048          # the KV budget: num_blocks * block_size token slots
    block_size: int = 16
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    sampling_requests: int = 500    # Alpaca-like trace for parallel sampling
    concurrency: int = 32           # sampling requests in flight at once
    widths: tuple[int, ...] = (2, 4, 6)
    prefix_len: int = 256
    prefix_requests: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("seed", "widths") and value < 1:
                raise ValueError(f"{f.name} must be at least 1, got {value}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be at least 1, got {self.widths}")
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(f"a pool of {self.num_blocks} blocks x {self.block_size} slots "
                             f"cannot hold one request of max_model_len {self.max_model_len}: "
                             f"raise num_blocks or lower max_model_len")
        if self.sampling_requests < self.concurrency:
            raise ValueError(f"sampling_requests ({self.sampling_requests}) must be at least "
                             f"concurrency ({self.concurrency}) to fill the batch")


def run(bench: MemoryBench) -> dict:
    """All three measurements, as plain data (what ``--json`` prints)."""
    trace = make_trace(SHAREGPT, bench.num_requests, 1, bench.max_model_len, bench.seed)
    samples = make_trace(ALPACA, bench.sampling_requests, max(bench.widths),
                         bench.max_model_len, bench.seed)
    return {
        "config": asdict(bench),
        "utilisation": {"trace": _describe(trace, SHAREGPT), "arrivals": "all at step 0",
                        "num_slots": bench.num_blocks * bench.block_size,
                        "rows": utilisation_rows(trace, bench)},
        "sharing": {"trace": _describe(samples, ALPACA),
                    "rows": parallel_sampling_rows(samples, bench)},
        "prefix": prefix_sharing(bench.prefix_len, bench.prefix_requests, bench.block_size,
                                 bench.seed),
    }


# ------------------------------------------------------------------------- traces

def make_trace(dataset: Dataset, num_requests: int, num_samples: int, max_model_len: int,
               seed: int) -> list[TraceRequest]:
    """Seeded requests with ``num_samples`` output lengths each, every one fitting
    ``max_model_len`` together with its prompt."""
    rng = random.Random(seed)
    trace = []
    for _ in range(num_requests):
        prompt_len = _lognormal(rng, dataset.prompt_mean, dataset.sigma, max_model_len - 1)
        output_lens = [_lognormal(rng, dataset.output_mean, dataset.sigma,
                                  max_model_len - prompt_len) for _ in range(num_samples)]
        trace.append(TraceRequest(_token_ids(rng, prompt_len), output_lens))
    return trace


def _describe(trace: list[TraceRequest], dataset: Dataset) -> dict:
    return {"dataset": dataset.name, "requests": len(trace),
            "prompt_mean": statistics.fmean(len(r.prompt_token_ids) for r in trace),
            "output_mean": statistics.fmean(n for r in trace for n in r.output_lens)}


def _lognormal(rng: random.Random, mean: float, sigma: float, high: int) -> int:
    mu = math.log(mean) - sigma ** 2 / 2  # so that the unclipped mean is ``mean``
    return min(max(round(rng.lognormvariate(mu, sigma)), 1), high)


def _token_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(TOKEN_LO, TOKEN_HI) for _ in range(n)]


# ------------------------------------------------------------------ 1. utilisation

def utilisation_rows(trace: list[TraceRequest], bench: MemoryBench) -> list[dict]:
    """Token slots / allocated slots for pagedserve and each static reservation policy."""
    num_slots = bench.num_blocks * bench.block_size
    runs = {"pagedserve": run_paged(trace, bench)}
    for name, reserve in static_reservations(bench.max_model_len).items():
        runs[f"static {name}"] = run_static(trace, num_slots, reserve)
    return [{"system": system, **utilisation(steps, num_slots),
             "paper_system": PAPER_UTILISATION[system][0],
             "paper": PAPER_UTILISATION[system][1]} for system, steps in runs.items()]


def run_paged(trace: list[TraceRequest], bench: MemoryBench) -> list[tuple[int, int]]:
    """Every request arrives at step 0 and runs through the real scheduler and block manager
    (prefix caching off, recompute preemption). Returns (allocated slots, token slots) per
    step, where a token slot holds a token of a sequence that has blocks."""
    bm = BlockManager(bench.block_size, bench.num_blocks, 0, enable_prefix_caching=False)
    scheduler = scheduler_over(bm, bench.max_model_len, bench.max_num_seqs,
                           bench.max_num_batched_tokens, preemption_mode="recompute")
    requests = [_request(i, r.prompt_token_ids, r.output_lens[0]) for i, r in enumerate(trace)]
    for request in requests:
        scheduler.add(request)  # makes the request's sequence
    seqs = {seq.seq_id: seq for request in requests for seq in request.seqs}
    steps = []
    while not (step := scheduler.schedule()).is_empty:
        blocks = bm.snapshot()
        steps.append((blocks.device.num_used * bench.block_size,
                      sum(seqs[seq_id].num_tokens for seq_id in blocks.tables)))
        scheduler.update(step)
        for seq in step.seqs:
            if seq.num_computed_tokens == seq.num_tokens:  # all in the cache: it samples
                seq.append_token(TOKEN_LO, 0.0)
                if seq.num_output_tokens == seq.request.params.max_tokens:
                    scheduler.finish(seq, "length")
    if scheduler.has_work:
        raise ValueError(f"a waiting request never fits the pool of {bench.num_blocks} "
                         f"blocks: raise num_blocks or lower max_model_len")
    return steps


def static_reservations(max_model_len: int) -> dict[str, Callable[[int], int]]:
    """The paper's Orca baselines: slots reserved up front for a request of ``total`` =
    prompt + output tokens."""
    return {"Max": lambda total: max_model_len,
            "Pow2": lambda total: 1 << (total - 1).bit_length(),
            "Oracle": lambda total: total}


def run_static(trace: list[TraceRequest], num_slots: int,
               reserve: Callable[[int], int]) -> list[tuple[int, int]]:
    """Contiguous reservation: requests are admitted first come, first served while their
    chunk fits ``num_slots``, and hold it until they finish. A request holds its prompt
    from admission and one more token per step. Returns (reserved slots, token slots) per
    step, counted as in ``run_paged``: its last token never needs a slot."""
    lengths = ((len(r.prompt_token_ids), r.output_lens[0]) for r in trace)
    # [tokens held, tokens when finished, reserved slots] per request
    waiting = deque([prompt_len, prompt_len + output_len, reserve(prompt_len + output_len)]
                    for prompt_len, output_len in lengths)
    running: list[list[int]] = []
    reserved = 0
    steps = []
    while waiting or running:
        while waiting and reserved + waiting[0][2] <= num_slots:
            running.append(waiting.popleft())
            reserved += running[-1][2]
        if not running:
            raise ValueError(f"a request of {waiting[0][1]} tokens reserves {waiting[0][2]} "
                             f"slots, more than the {num_slots} of the pool")
        steps.append((reserved, sum(r[0] for r in running)))
        for r in running:
            r[0] += 1
        reserved -= sum(r[2] for r in running if r[0] == r[1])
        running = [r for r in running if r[0] < r[1]]
    return steps


def utilisation(steps: list[tuple[int, int]], num_slots: int) -> dict:
    """Token slots / allocated slots, averaged over the steps at peak allocation and over
    the busy steps (at least ``BUSY`` of ``num_slots`` allocated)."""
    peak = max(allocated for allocated, _ in steps)
    busy = [tokens / allocated for allocated, tokens in steps if allocated >= BUSY * num_slots]
    if not busy:
        raise ValueError(f"the trace never allocated {BUSY:.0%} of the {num_slots} slots "
                         f"(peak {peak}): use more requests or a smaller pool")
    at_peak = [tokens / allocated for allocated, tokens in steps if allocated == peak]
    return {"at_peak": statistics.fmean(at_peak), "peak_steps": len(at_peak),
            "busy_mean": statistics.fmean(busy), "busy_steps": len(busy), "steps": len(steps)}


# ---------------------------------------------------------------- 2. sharing

def parallel_sampling_rows(trace: list[TraceRequest], bench: MemoryBench) -> list[dict]:
    """One row per width. Rows of other kinds (beam search) share the same shape."""
    return [{"kind": "parallel sampling", "width": n,
             "saved": parallel_sampling_savings(trace, n, bench.block_size, bench.concurrency)}
            for n in bench.widths]


def parallel_sampling_savings(trace: list[TraceRequest], n: int, block_size: int,
                              concurrency: int) -> float:
    """Share of blocks that sharing saves, 1 - blocks in use / blocks in all tables,
    averaged over the steps with ``concurrency`` requests in flight.

    Requests of ``n`` samples go through the real scheduler: the first sample prefills the
    prompt but its last token, the others are forked from it, sharing its blocks; each
    computes the last prompt token itself and grows a token a step (copy-on-write splits
    the shared last block) until its own output length, the first n of ``output_lens``. A
    finished request makes room for the next. The pool is large enough that nothing waits.
    """
    longest = max(len(r.prompt_token_ids) + max(r.output_lens[:n]) for r in trace)
    num_blocks = concurrency * n * (math.ceil(longest / block_size) + 1)
    bm = BlockManager(block_size, num_blocks, 0, watermark=0.0, enable_prefix_caching=False)
    scheduler = scheduler_over(bm, longest, concurrency * n, num_blocks * block_size)
    pending = deque(enumerate(trace))
    # Each request in flight, by id, with its samples' output lengths.
    live: dict[str, tuple[Request, list[int]]] = {}
    saved = []
    while pending or scheduler.has_work:
        while pending and len(live) < concurrency:
            i, traced = pending.popleft()
            request = _request(i, traced.prompt_token_ids, max(traced.output_lens[:n]), n)
            scheduler.add(request)
            live[request.request_id] = request, traced.output_lens[:n]
        step = scheduler.schedule()
        if len(live) == concurrency:
            saved.append(sharing_saves(bm.snapshot()))
        scheduler.update(step)
        for seq in step.seqs:
            if seq.num_computed_tokens == seq.num_tokens:  # all in the cache: it samples
                seq.append_token(TOKEN_LO, 0.0)
                if seq.num_output_tokens == live[seq.request.request_id][1][seq.sample_index]:
                    scheduler.finish(seq, "length")
        live = {key: entry for key, entry in live.items() if not entry[0].is_finished}
    return statistics.fmean(saved)


# ------------------------------------------------------------------- 3. prefix

def prefix_sharing(prefix_len: int, num_requests: int, block_size: int, seed: int) -> dict:
    """Requests behind one shared system prompt, each admitted once the previous one has
    computed its prompt, with prefix caching on and off. ``hits_per_request`` counts the
    prompt tokens each found cached."""
    rng = random.Random(seed)
    prefix = _token_ids(rng, prefix_len)
    prompts = [prefix + _token_ids(rng, rng.randint(*SUFFIX_LENS)) for _ in range(num_requests)]
    hits = _prefill(prompts, block_size, enable_prefix_caching=True)
    misses = _prefill(prompts, block_size, enable_prefix_caching=False)
    total = sum(map(len, prompts))
    return {"prefix_len": prefix_len, "requests": num_requests, "suffix_lens": SUFFIX_LENS,
            "queries": total, "hits": sum(hits), "hits_per_request": hits,
            "prefill_tokens": {"without caching": total - sum(misses),
                               "with caching": total - sum(hits)}}


def _prefill(prompts: list[list[int]], block_size: int,
             enable_prefix_caching: bool) -> list[int]:
    """The prompt tokens each prompt finds cached, prefilled one after the other."""
    num_blocks = sum(math.ceil(len(ids) / block_size) for ids in prompts)
    bm = BlockManager(block_size, num_blocks, 0, watermark=0.0,
                      enable_prefix_caching=enable_prefix_caching)
    hits = []
    for i, ids in enumerate(prompts):
        request = _request(i, ids, max_tokens=1)
        seq = Sequence(i, ids, request)
        bm.allocate(seq)  # marks the cached prefix computed
        hits.append(seq.num_computed_tokens)
        seq.num_computed_tokens = seq.num_tokens  # its prefill ran
        bm.cache_computed_blocks(seq)
    return hits


def sharing_saves(blocks: BlockSnapshot) -> float:
    """The share of blocks that sharing saves: 1 - blocks in use / blocks in all tables."""
    return 1 - blocks.device.num_used / sum(map(len, blocks.tables.values()))


def scheduler_over(bm: BlockManager, max_model_len: int, *args, **kwargs) -> Scheduler:
    """A scheduler (``Scheduler(*args, **kwargs)``) that schedules into ``bm``, as into the
    pool of a ready executor."""
    scheduler = Scheduler(*args, **kwargs)
    scheduler.attach(ExecutorSession(bm, ContextLimit(max_model_len, "the bench holds no more")))
    return scheduler


def _request(request_no: int, prompt_token_ids: list[int], max_tokens: int,
             n: int = 1) -> Request:
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    return Request(str(request_no), b"bench", params, prompt_token_ids, stream=False)


# ------------------------------------------------------------------- report

def format_report(results: dict) -> str:
    """The three tables as text, the paper's numbers beside ours."""
    return "\n\n".join([_utilisation_table(results), _sharing_table(results),
                        _prefix_table(results)])


def _utilisation_table(results: dict) -> str:
    u, cfg = results["utilisation"], results["config"]
    header = (
        "1. KV slot utilisation: token slots / allocated slots (paper Fig. 2)\n"
        f"   trace: {_trace_line(u['trace'], cfg['seed'])}, {u['arrivals']}\n"
        f"   pool: {cfg['num_blocks']} blocks x {cfg['block_size']} = {u['num_slots']} slots, "
        f"max_model_len {cfg['max_model_len']}; pagedserve: real scheduler + block manager, "
        "recompute preemption, prefix caching off\n"
        "   averaged over the steps at peak allocation, and over the busy steps "
        f"(>= {BUSY:.0%} of the slots allocated)\n"
        f"   {'system':<15} {'at peak':>8} {'peak steps':>10} {'busy mean':>10} "
        f"{'busy steps':>13}   paper (token states)")
    rows = [f"   {r['system']:<15} {r['at_peak']:>8.1%} {r['peak_steps']:>10} "
            f"{r['busy_mean']:>10.1%} {r['busy_steps']:>6}/{r['steps']:<6}   "
            f"{r['paper']:.1%} {r['paper_system']}" for r in u["rows"]]
    return "\n".join([header, *rows])


def _sharing_table(results: dict) -> str:
    s, cfg = results["sharing"], results["config"]
    header = (
        "2. Blocks saved by sharing: 1 - blocks in use / blocks in all tables (paper Fig. 15)\n"
        f"   trace: {_trace_line(s['trace'], cfg['seed'])} per sample; {cfg['concurrency']} "
        f"requests in flight, block size {cfg['block_size']}\n"
        f"   {'kind':<18} {'width':>5} {'saved':>7}   paper, Alpaca, widths 2-6")
    rows = [f"   {r['kind']:<18} {r['width']:>5} {r['saved']:>7.1%}   "
            f"{PAPER_SAVED[r['kind']][0]:.1%}-{PAPER_SAVED[r['kind']][1]:.1%}"
            for r in s["rows"]]
    if "beams" in s:
        b = s["beams"]
        rows.append(f"   beam search: {b['model']} in process, {b['requests']} Alpaca-style "
                    f"instructions, {b['concurrency']} in flight, output limits drawn as above")
    return "\n".join([header, *rows])


def _prefix_table(results: dict) -> str:
    p, cfg = results["prefix"], results["config"]
    without, with_ = p["prefill_tokens"]["without caching"], p["prefill_tokens"]["with caching"]
    low, high = p["suffix_lens"]
    return (
        "3. Prefill saved by a shared prefix (prefix caching)\n"
        f"   {p['requests']} requests: a {p['prefix_len']}-token shared prefix + {low}-{high} "
        f"own tokens (seed {cfg['seed']}), block size {cfg['block_size']}, each admitted "
        "after the previous prefill\n"
        f"   prefix-cache hits / queries: {p['hits']} / {p['queries']} tokens "
        f"({p['hits'] / p['queries']:.1%}); per request: {p['hits_per_request']}\n"
        f"   prompt tokens computed: {without} without caching, {with_} with caching "
        f"({1 - with_ / without:.1%} fewer)")


def _trace_line(trace: dict, seed: int) -> str:
    return (f"{trace['requests']} {trace['dataset']}-like requests (seed {seed}), "
            f"prompt mean {trace['prompt_mean']:.1f}, output mean {trace['output_mean']:.1f}")


def save_plot(results: dict, path: Path) -> bool:
    """Write the three measurements as one PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    _plot_utilisation(axes[0], results["utilisation"]["rows"])
    _plot_sharing(axes[1], results["sharing"]["rows"])
    _plot_prefix(axes[2], results["prefix"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_utilisation(ax, rows: list[dict]) -> None:
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["busy_mean"] * 100 for r in rows], 0.4,
           label=f"ours (mean while >={BUSY:.0%} full)")
    ax.bar([i + 0.2 for i in x], [r["paper"] * 100 for r in rows], 0.4, label="paper",
           color="lightgray")
    ax.set_xticks(list(x), [r["system"] for r in rows])
    ax.set_ylabel("token slots / allocated slots (%)")
    ax.set_title("KV slot utilisation")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper right")


def _plot_sharing(ax, rows: list[dict]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in rows):
        own = [r for r in rows if r["kind"] == kind]
        line, = ax.plot([r["width"] for r in own], [r["saved"] * 100 for r in own], "o-",
                        label=f"{kind} (ours)")
        low, high = PAPER_SAVED[kind]
        ax.axhspan(low * 100, high * 100, color=line.get_color(), alpha=0.15,
                   label=f"{kind} (paper range)")
    ax.set_xticks(sorted({r["width"] for r in rows}))
    ax.set_xlabel("width")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("blocks saved (%)")
    ax.set_title("Blocks saved by sharing")
    ax.legend()


def _plot_prefix(ax, prefix: dict) -> None:
    tokens = prefix["prefill_tokens"]
    ax.bar(list(tokens), list(tokens.values()), color=["lightgray", "tab:blue"])
    ax.set_ylabel("prompt tokens computed")
    ax.set_title(f"{prefix['requests']} requests, {prefix['prefix_len']}-token shared prefix")
