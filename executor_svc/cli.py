"""``pagedserve executor``: run the executor service in the foreground."""
from __future__ import annotations

import os
import signal

import click

from common import options
from common.config import ExecutorConfig
from common.log import setup_logging


@click.command("executor")
@click.option("--scheduler", default="tcp://127.0.0.1:5556", show_default=True,
              help="The scheduler's executor endpoint.")
@lambda f: options.apply(options.EXECUTOR_OPTIONS + options.SHARED_OPTIONS, f)
def main(**kwargs) -> None:
    """Run the executor: model, KV cache and sampler; registers with the scheduler."""
    try:
        config = ExecutorConfig(**kwargs)
        setup_logging(config.log_format)
        if config.resolved_attention_backend() == "triton" and config.device == "cpu":
            # On CPU tensors the kernels run only in triton's interpreter, which must be
            # chosen before triton is first imported (transformers imports it).
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            from executor_svc.service import ExecutorService
        except ModuleNotFoundError as exc:  # a base install: scheduler and client only
            raise click.ClickException(f"the executor needs the model side ({exc}): "
                                       f"pip install 'pagedserve[executor]'") from None

        service = ExecutorService(config)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    service.serve_forever()
