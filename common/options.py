"""Command-line options of the two services, shared by their commands and ``pagedserve up``.

Each option's name is the matching ``SchedulerConfig`` / ``ExecutorConfig`` field.
"""
from __future__ import annotations

import click

SCHEDULER_OPTIONS = [
    click.option("--block-size", type=int, default=16, show_default=True,
                 help="Tokens per KV cache block."),
    click.option("--max-num-seqs", type=int, default=256, show_default=True,
                 help="Sequences computed in one step at most."),
    click.option("--max-num-batched-tokens", type=int, default=2048, show_default=True,
                 help="Tokens computed in one step at most; longer prompts are split into chunks "
                      "across steps."),
    click.option("--max-model-len", type=int, default=None,
                 help="Context length limit [default: the model's]."),
    click.option("--client-timeout", type=float, default=30.0, show_default=True,
                 help="Seconds a client with live requests may stay silent (clients send a "
                      "heartbeat every second) before it is taken for gone and its requests "
                      "are aborted."),
    click.option("--executor-timeout", type=float, default=1.5, show_default=True,
                 help="Seconds the registered executor may stay silent (it sends a heartbeat "
                      "every 0.25 s, even mid-step) before it is taken for dead: its running "
                      "and swapped sequences wait to be recomputed on the next executor that "
                      "registers."),
    click.option("--max-message-mb", type=float, default=16.0, show_default=True,
                 help="Largest message the scheduler accepts on any socket; a peer that sends "
                      "a larger one is disconnected before it is read into memory."),
    click.option("--max-waiting", type=int, default=4096, show_default=True,
                 help="Requests queued before admission at most; beyond it new requests get "
                      "an 'overloaded' error instead of growing memory without bound."),
    click.option("--preemption-mode", type=click.Choice(["auto", "swap", "recompute"]),
                 default="auto", show_default=True,
                 help="When blocks run out: swap the latest arrival to CPU memory, recompute "
                      "it later, or choose per preemption by measured cost."),
    click.option("--prefix-caching/--no-prefix-caching", "enable_prefix_caching",
                 default=True, show_default=True,
                 help="Reuse the KV of full blocks whose tokens were computed before."),
    click.option("--async-scheduling/--no-async-scheduling", default=True, show_default=True,
                 help="While a step runs, build and send the next one when it only continues "
                      "the same decodes, so that the executor never waits for the scheduler "
                      "between such steps."),
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="Address the scheduler's sockets bind to."),
    click.option("--client-port", type=int, default=5555, show_default=True),
    click.option("--executor-port", type=int, default=5556, show_default=True),
    click.option("--admin-port", type=int, default=5557, show_default=True),
    click.option("--metrics-port", type=int, default=None,
                 help="Serve Prometheus metrics at http://HOST:PORT/metrics [default: off]."),
    click.option("--log-stats-interval", type=float, default=5.0, show_default=True,
                 help="Seconds between status log lines while busy (throughput, queues, KV "
                      "usage, prefix hit rate); 0 turns them off."),
]

EXECUTOR_OPTIONS = [
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                 default="auto", show_default=True,
                 help="Weights and KV cache dtype (auto: float32 on CPU, half on CUDA)."),
    click.option("--kv-cache-dtype", type=click.Choice(["auto", "bfloat16"]), default="auto",
                 show_default=True,
                 help="KV cache dtype (auto: the weights'). bfloat16 under float32 weights "
                      "holds twice the tokens in the same memory and halves what decode "
                      "attention reads; keys and values are rounded to bfloat16, so outputs "
                      "may differ from float32's. Needs the torch attention backend (the "
                      "CPU's)."),
    click.option("--kv-cache-gb", type=float, default=None,
                 help="KV pool size in GiB [default: 4 on CPU; CUDA: what the profiling "
                      "pass leaves]."),
    click.option("--num-device-blocks", type=int, default=None,
                 help="KV pool size in blocks (instead of --kv-cache-gb)."),
    click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True),
    click.option("--swap-space-gb", type=float, default=4.0, show_default=True,
                 help="CPU swap space for preempted sequences, in GiB."),
    click.option("--num-cpu-blocks", type=int, default=None,
                 help="CPU swap space in blocks (instead of --swap-space-gb)."),
    click.option("--attention-backend", type=click.Choice(["auto", "torch", "triton"]),
                 default="auto", show_default=True,
                 help="auto: triton on CUDA, torch on CPU (triton on CPU runs in triton's "
                      "interpreter: for tests)."),
    click.option("--enforce-eager/--no-enforce-eager", default=False, show_default=True,
                 help="Run every step eagerly: no CUDA graphs for decode steps (on CUDA with "
                      "triton attention, pure-decode steps replay a graph per batch size)."),
    click.option("--tensor-parallel-size", type=int, default=1, show_default=True,
                 help="Shard the model's heads and MLP over this many executor processes "
                      "(ranks), which sum their partial results with all-reduces (gloo on "
                      "CPU, NCCL on CUDA). Without --tp-rank the executor starts the other "
                      "ranks on this machine itself."),
    click.option("--tp-rank", type=int, default=None, envvar="PAGEDSERVE_TP_RANK",
                 help="This process's rank, for ranks started one by one (across machines): "
                      "rank 0 talks to the scheduler, the others only to rank 0. Needs "
                      "--tp-master. [env: PAGEDSERVE_TP_RANK]"),
    click.option("--tp-master", default=None, envvar="PAGEDSERVE_TP_MASTER",
                 help="HOST:PORT where rank 0 runs the group's rendezvous; every rank "
                      "passes the same one. [env: PAGEDSERVE_TP_MASTER]"),
]

AUTH_OPTIONS = [
    click.option("--auth/--no-auth", default=False, show_default=True,
                 help="CurveZMQ on every socket: encrypted, and only peers with the right key "
                      "get in (pagedserve keygen makes the keys)."),
    click.option("--keys", type=click.Path(file_okay=False), default=None,
                 help="Keys directory for --auth [default: $PAGEDSERVE_KEYS or "
                      "~/.config/pagedserve/keys]; PAGEDSERVE_<ROLE>_PUBLIC_KEY / "
                      "_SECRET_KEY override single keys."),
]

SHARED_OPTIONS = [
    *AUTH_OPTIONS,
    click.option("--model", type=click.Path(file_okay=False), default=None,
                 help="HF model directory [default: the prepared SmolLM2-135M-Instruct]."),
    click.option("--log-format", type=click.Choice(["console", "json"]), default="console",
                 show_default=True),
]


def apply(options: list, func):
    for option in reversed(options):
        func = option(func)
    return func


def to_flags(kwargs: dict, option_list: list) -> list[str]:
    """The command line that passes ``kwargs`` on to a command taking ``option_list``."""
    flags = []
    for param in apply(option_list, lambda **_: None).__click_params__:
        value = kwargs.get(param.name)
        if param.is_flag:
            flags.append(param.opts[0] if value else param.secondary_opts[0])
        elif value is not None:
            flags += [param.opts[0], str(value)]
    return flags
