"""``pagedserve scheduler``: run the scheduler service in the foreground."""
from __future__ import annotations

import click

from pagedserve.common import options
from pagedserve.common.cli import serve_until_signalled
from pagedserve.common.config import SchedulerConfig
from pagedserve.common.log import setup_logging


@click.command("scheduler")
@lambda f: options.apply(options.SCHEDULER_OPTIONS + options.SHARED_OPTIONS, f)
def main(**kwargs) -> None:
    """Run the scheduler: block manager, continuous batching, client and admin sockets."""
    from pagedserve.scheduler_svc.service import SchedulerService

    try:
        config = SchedulerConfig(**kwargs)
        setup_logging(config.log_format)
        service = SchedulerService(config)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    serve_until_signalled(service)
