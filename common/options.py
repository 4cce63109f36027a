"""Command-line options of the two services, shared by their commands and ``pagedserve up``.

Each option is derived from the ``SchedulerConfig`` / ``ExecutorConfig`` field of its name:
its default, help text, choices and environment variable are the field's (``config.setting``),
its type the field's annotation; a bool field becomes a ``--x/--no-x`` flag.
"""
from __future__ import annotations

import typing
from dataclasses import fields

import click

from pagedserve.common.config import ExecutorConfig, SchedulerConfig, ServiceConfig

# Where the flag is not the field's name: the switch reads better without "enable".
_FLAG_NAMES = {"enable_prefix_caching": "prefix-caching"}
# Fields naming a directory: click rejects a file given there; and the other way round.
_DIRECTORIES = {"model", "keys"}
_FILES = {"chat_template"}


def option(config: type, name: str):
    """The click option of field ``name`` of the config dataclass ``config``."""
    spec = next(f for f in fields(config) if f.name == name)
    flag = "--" + _FLAG_NAMES.get(name, name.replace("_", "-"))
    kind = _value_type(typing.get_type_hints(config)[name])
    common = dict(default=spec.default, show_default=True,
                  help=spec.metadata["help"], envvar=spec.metadata["envvar"], show_envvar=True)
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, **common)
    return click.option(flag, name, type=_click_type(name, kind, spec.metadata["choices"]),
                        **common)


def _value_type(hint) -> type:
    """``int`` for ``int | None``: the type of the values other than None."""
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def _click_type(name: str, kind: type, choices: tuple[str, ...]):
    if choices:
        return click.Choice(choices)
    if name in _DIRECTORIES:
        return click.Path(file_okay=False)
    return click.Path(dir_okay=False) if name in _FILES else kind


def _options(config: type, leave_out: tuple[str, ...] = ()) -> list:
    """Options of the flags of ``config``, in field order, but those named in ``leave_out``."""
    return [option(config, f.name) for f in fields(config)
            if f.metadata["flag"] and f.name not in leave_out]


_SHARED = tuple(f.name for f in fields(ServiceConfig))
_AUTH = ("auth", "keys")
SCHEDULER_OPTIONS = _options(SchedulerConfig, leave_out=_SHARED)
# --scheduler is the executor command's alone: `up` connects it to the scheduler it starts, and
# tensor-parallel ranks other than 0 talk only to rank 0.
EXECUTOR_OPTIONS = _options(ExecutorConfig, leave_out=(*_SHARED, "scheduler"))
AUTH_OPTIONS = [option(ServiceConfig, name) for name in _AUTH]
SHARED_OPTIONS = AUTH_OPTIONS + _options(ServiceConfig, leave_out=_AUTH)


def apply(options: list, func):
    """``func`` decorated with ``options``, the first listed first in ``--help``."""
    for decorate in reversed(options):
        func = decorate(func)
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
