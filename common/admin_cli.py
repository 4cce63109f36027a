"""``pagedserve pool | seqs | seq ID | stats``: read-only views from the scheduler's admin
socket, once or redrawn in place with ``--watch``."""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable

import click

from pagedserve.common import pool_view
from pagedserve.common.cli import AdminEndpoint, admin_options, admin_request

CLEAR_LINE, CLEAR_BELOW, HOME = "\x1b[K", "\x1b[J", "\x1b[H"


def view_options(func):
    """``--json``, ``--watch``, ``--interval`` and the admin endpoint options."""
    func = click.option("--interval", type=float, default=1.0, show_default=True,
                        help="Seconds between redraws with --watch.")(func)
    func = click.option("--watch", is_flag=True,
                        help="Redraw every --interval seconds until Ctrl-C.")(func)
    func = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")(func)
    return admin_options(func)


def show(cmd: str, render: Callable[[dict], str], as_json: bool, watch: bool,
         interval: float, admin: AdminEndpoint, **fields) -> None:
    """Ask the admin socket and print the reply rendered (or as JSON); with ``watch``
    again every ``interval`` seconds, in place on a terminal, until Ctrl-C."""
    if interval <= 0:
        raise click.BadParameter(f"must be a positive number of seconds, got {interval}",
                                 param_hint="--interval")
    address = admin.address

    def text() -> str:
        data = admin_request(cmd, admin, **fields)
        if "error" in data:
            raise click.ClickException(data["error"])
        return json.dumps(data) if as_json else render(data)

    if not watch:
        click.echo(text())
        return
    tty = sys.stdout.isatty()
    try:
        while True:
            body = text()
            stamp = f"pagedserve {cmd}  {address}  {time.strftime('%H:%M:%S')}  (Ctrl-C quits)"
            if tty:  # redraw in place: home, each line cleared to its end, the rest cleared
                lines = [stamp, *body.splitlines()]
                click.echo(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines)
                           + CLEAR_BELOW, nl=False)
            else:
                click.echo(f"{stamp}\n{body}\n")
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo()


def _color() -> bool:
    return sys.stdout.isatty()


def _map_width() -> int:
    return max(16, min(shutil.get_terminal_size().columns - 4, 96))


@click.command()
@view_options
def pool(as_json, watch, interval, admin) -> None:
    """Show the device and CPU block pools: block counts (free + used = total; cached:
    free blocks still holding a reusable prefix; shared: refcount > 1), the refcount
    histogram, token slots used vs allocated, prefix cache hits, preemptions, queues, and a
    map of the pools, one cell per block (or per run of blocks, for large pools)."""
    show("pool", lambda data: pool_view.render_pool(data, _map_width(), _color()),
         as_json, watch, interval, admin)


@click.command()
@view_options
def seqs(as_json, watch, interval, admin) -> None:
    """List the running, swapped and waiting sequences with their block counts."""
    show("seqs", pool_view.render_seqs, as_json, watch, interval, admin)


@click.command()
@click.argument("seq_id", type=int)
@view_options
def seq(seq_id, as_json, watch, interval, admin) -> None:
    """Show sequence SEQ_ID's block table: each block's id, refcount and fill (tokens)."""
    show("seq", pool_view.render_seq, as_json, watch, interval, admin,
         seq_id=seq_id)


@click.command()
@view_options
def stats(as_json, watch, interval, admin) -> None:
    """Show throughput (tokens/s over the last 10 s), queue lengths, and percentiles (p50,
    p90, p99) of time to first token, inter-token and end-to-end latency."""
    show("stats", pool_view.render_stats, as_json, watch, interval, admin)
