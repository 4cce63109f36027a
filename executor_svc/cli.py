"""``pagedserve executor``: run the executor service in the foreground."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import click

from pagedserve.common import options
from pagedserve.common.cli import serve_until_signalled
from pagedserve.common.config import LOOPBACK, ExecutorConfig
from pagedserve.common.log import setup_logging
from pagedserve.common.up import stop_processes


@click.command("executor")
@options.option(ExecutorConfig, "scheduler")
@lambda f: options.apply(options.EXECUTOR_OPTIONS + options.SHARED_OPTIONS, f)
def main(**kwargs) -> None:
    """Run the executor: model, KV cache and sampler; registers with the scheduler."""
    ranks: list[subprocess.Popen] = []
    try:
        try:
            config = ExecutorConfig(**kwargs)
            if config.tensor_parallel_size > 1 and config.tp_rank is None:
                ranks = _start_local_ranks(kwargs)
                config = ExecutorConfig(**kwargs)
            setup_logging(config.log_format)
            if config.resolved_attention_backend() == "triton" and config.device == "cpu":
                # On CPU tensors the kernels run only in triton's interpreter, which must be
                # chosen before triton is first imported (transformers imports it).
                os.environ["TRITON_INTERPRET"] = "1"
            try:
                from pagedserve.executor_svc.service import ExecutorService
            except ModuleNotFoundError as exc:  # a base install: scheduler and client only
                raise click.ClickException(f"the executor needs the model side ({exc}): "
                                           f"pip install 'pagedserve[executor]'") from None

            service = ExecutorService(config)
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        serve_until_signalled(service)
    finally:
        stop_processes(ranks)  # they stop with rank 0; if it failed, they are told here


def _start_local_ranks(kwargs: dict) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 on this machine, with a rendezvous on a free local port; this
    process becomes rank 0 (``kwargs`` is updated). Each rank gets an equal share of the
    CPUs for its threads unless ``OMP_NUM_THREADS`` says otherwise, and on CUDA a card of
    its own."""
    size = kwargs["tensor_parallel_size"]
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    kwargs.update(tp_rank=0, tp_master=f"{LOOPBACK}:{port}")
    threads = max(1, len(os.sched_getaffinity(0)) // size)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # before torch is imported
    # On CUDA each rank takes its own card: rank r cuda:r, unless one was named.
    device = kwargs["device"]
    per_rank = (lambda rank: f"cuda:{rank}") if device == "cuda" else (lambda rank: device)
    kwargs["device"] = per_rank(0)
    executor_options = options.EXECUTOR_OPTIONS + options.SHARED_OPTIONS
    return [subprocess.Popen([sys.executable, "-m", "pagedserve.common.cli", "executor",
                              *options.to_flags({**kwargs, "tp_rank": rank,
                                                 "device": per_rank(rank)}, executor_options)])
            for rank in range(1, size)]
