"""Progress bars for long work (model preparation, benchmarks), drawn on stderr only when
it is a terminal: logs and pipes get plain lines or nothing."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click


@contextmanager
def progress(length: int, label: str, log_lines: bool = False) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(message)``: one of ``length`` steps done. On a terminal it moves a
    bar showing the message; elsewhere it prints the message as a line when ``log_lines``,
    else nothing."""
    if not sys.stderr.isatty():
        yield (lambda message: click.echo(message, err=True)) if log_lines else (lambda _: None)
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_eta=False,
                           item_show_func=lambda message: message) as bar:
        yield lambda message: bar.update(1, message)
