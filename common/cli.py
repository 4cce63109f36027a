"""The ``pagedserve`` command.

Service commands live beside their services and are imported only when invoked (lazy
subcommands), so ``pagedserve generate`` or ``pagedserve pool`` never import torch.
"""
from __future__ import annotations

import functools
import importlib
import json
import signal
import sys
from dataclasses import dataclass

import click
import zmq

from pagedserve.common import options
from pagedserve.common.auth import PeerKeys, peer_keys
from pagedserve.common.auth import keygen as keygen_files
from pagedserve.common.config import KEYS_DIR_DEFAULT, SchedulerConfig, tcp_endpoint
from pagedserve.common.sampling import MODEL_DEFAULTS, SamplingParams

LAZY_COMMANDS = {  # name: (module:attribute, short help shown without importing it)
    "scheduler": ("pagedserve.scheduler_svc.cli:main", "Run the scheduler service."),
    "executor": ("pagedserve.executor_svc.cli:main", "Run the executor service."),
    "prepare-model": ("pagedserve.executor_svc.prepare_model:main",
                      "Convert the default model into the local cache."),
    "gateway": ("pagedserve.gateway.cli:main", "Serve the OpenAI HTTP API (needs the gateway "
                                               "extra)."),
    "up": ("pagedserve.common.up:main", "Run scheduler, executor and gateway locally."),
    "down": ("pagedserve.common.up:down", "Stop a `pagedserve up` running on this machine."),
    "bench": ("pagedserve.benchmarks.cli:bench",
              "Benchmarks: throughput of running services, memory."),
    "pool": ("pagedserve.common.admin_cli:pool",
             "Show the device and CPU block pools and their map."),
    "seqs": ("pagedserve.common.admin_cli:seqs",
             "List the running, swapped and waiting sequences."),
    "seq": ("pagedserve.common.admin_cli:seq", "Show one sequence's block table."),
    "stats": ("pagedserve.common.admin_cli:stats", "Throughput, queues and latency percentiles."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name][0].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [(name, LAZY_COMMANDS[name][1] if name in LAZY_COMMANDS
                 else self.commands[name].get_short_help_str(60))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
def main() -> None:
    """pagedserve: LLM serving on PagedAttention."""


def _model_default(name: str) -> str:
    """The help of an option left unset to the served model's default."""
    return (f"[default: the model's generation_config.json, else "
            f"{MODEL_DEFAULTS[name]}]")


@main.command()
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=None, help=_model_default("max_tokens"))
@click.option("--n", type=int, default=1, show_default=True,
              help="Completions to return (parallel sampling, or the best beams).")
@click.option("--best-of", type=int, default=None,
              help="Samples to draw; the n of highest cumulative logprob are returned.")
@click.option("--beam-width", type=int, default=1, show_default=True,
              help="Above 1: beam search (deterministic).")
@click.option("--temperature", type=float, default=None,
              help="0 is greedy.  " + _model_default("temperature"))
@click.option("--top-p", type=float, default=None, help=_model_default("top_p"))
@click.option("--top-k", type=int, default=None, help="0 disables.  " + _model_default("top_k"))
@click.option("--seed", type=int, default=None)
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--chat", is_flag=True,
              help="Send PROMPT as a user message, in the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole output as JSON.")
@click.option("--server", default=tcp_endpoint(SchedulerConfig.client_port), show_default=True,
              help="The scheduler's client endpoint.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds of server silence before giving up.")
@lambda f: options.apply(options.AUTH_OPTIONS, f)
def generate(prompt, max_tokens, n, best_of, beam_width, temperature, top_p, top_k, seed,
             stream, chat, as_json, server, timeout, auth, keys) -> None:
    """Generate a continuation of PROMPT (with --chat: the model's answer to it). The
    sampling options left out are the server's to set: the model's defaults."""
    from pagedserve.common.client import Client, PagedServeError

    if stream and (n > 1 or beam_width > 1 or (best_of or 1) > 1):
        raise click.UsageError("--stream prints one completion: use it with --n 1, "
                               "--best-of 1 and --beam-width 1")
    try:
        params = SamplingParams(n=n, best_of=best_of, beam_width=beam_width,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens)
        messages = [{"role": "user", "content": prompt}]
        with Client(server, timeout=timeout, keys=client_keys(auth, keys)) as client:
            if stream and not as_json:
                deltas = (client.chat_stream(messages, params) if chat
                          else client.stream(prompt, params))
                for delta in deltas:
                    click.echo(delta.outputs[0].text, nl=False)
                click.echo()
                return
            out = client.chat(messages, params) if chat else client.generate(prompt, params)
    except (PagedServeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({
            "request_id": out.request_id, "prompt": out.prompt,
            "prompt_token_ids": out.prompt_token_ids,
            "outputs": [vars(o) for o in out.outputs]}, default=str))
    elif len(out.outputs) == 1:
        click.echo(out.outputs[0].text)
    else:
        for o in out.outputs:
            click.echo(f"[{o.index}] {o.text}")


@dataclass(frozen=True)
class AdminEndpoint:
    """The scheduler's admin socket, and the client keys if it runs with ``--auth``."""

    address: str
    keys: PeerKeys | None = None

    def __str__(self) -> str:
        return self.address


def serve_until_signalled(service) -> None:
    """Run a service's ``serve_forever`` in the foreground; SIGINT or SIGTERM stops it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    service.serve_forever()


def admin_request(cmd: str, admin: str | AdminEndpoint, timeout_s: float = 5.0,
                  **fields) -> dict:
    """Ask the scheduler's admin socket ``{"cmd": cmd, **fields}``; raises
    ``click.ClickException`` if it is silent (or lets nobody in without the right key)."""
    endpoint = admin if isinstance(admin, AdminEndpoint) else AdminEndpoint(admin)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    # A REQ socket's send waits for a connection: one the scheduler refused (keys it does
    # not know) never comes, so the send has the same deadline as the reply.
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    if endpoint.keys is not None:
        endpoint.keys.secure(sock)
    sock.connect(endpoint.address)
    try:
        try:
            sock.send(json.dumps({"cmd": cmd, **fields}).encode())
        except zmq.Again:
            raise _silent(endpoint, timeout_s) from None
        if not sock.poll(int(timeout_s * 1000)):
            raise _silent(endpoint, timeout_s)
        return json.loads(sock.recv())
    finally:
        sock.close()


def _silent(endpoint: AdminEndpoint, timeout_s: float) -> click.ClickException:
    return click.ClickException(f"no reply from the admin socket {endpoint} within "
                                f"{timeout_s:g} s: is the scheduler running (and, with "
                                f"--auth, are these its keys)?")


def client_keys(auth: bool, keys: str | None) -> PeerKeys | None:
    """The client's keys for ``--auth`` from the ``--keys`` directory (or the environment);
    None without ``--auth``. Missing keys are a ``click.ClickException``."""
    if not auth:
        return None
    try:
        return peer_keys("client", keys)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def admin_options(func):
    """``--admin``, ``--admin-port``, ``--auth`` and ``--keys``, passed on to ``func`` as one
    ``admin`` argument, an ``AdminEndpoint``."""

    @functools.wraps(func)
    def command(*args, admin, admin_port, auth, keys, **kwargs):
        return func(*args, admin=AdminEndpoint(admin or tcp_endpoint(admin_port),
                                               client_keys(auth, keys)), **kwargs)

    command = options.apply(options.AUTH_OPTIONS, command)
    command = click.option("--admin", default=None, help="Admin endpoint, tcp://HOST:PORT "
                           "(overrides --admin-port).")(command)
    return options.option(SchedulerConfig, "admin_port")(command)


@main.command()
@admin_options
@click.option("--live", is_flag=True,
              help="Healthy once the scheduler answers, before an executor registers.")
def health(admin, live) -> None:
    """Exit 0 when the scheduler is up and an executor is ready (with --live: when the
    scheduler answers at all), 1 otherwise."""
    try:
        data = admin_request("health", admin, timeout_s=3.0)
    except click.ClickException as exc:
        click.echo(exc.message, err=True)
        sys.exit(1)
    click.echo(json.dumps(data))
    sys.exit(0 if live or data.get("status") == "ready" else 1)


@main.command()
@click.option("--keys", type=click.Path(file_okay=False), default=None,
              help=f"Where to write them [default: {KEYS_DIR_DEFAULT}].")
@click.option("--force", is_flag=True, help="Replace existing keys.")
def keygen(keys, force) -> None:
    """Make the CURVE key pairs for --auth: scheduler, executor and client. Give each
    process the directory (or its keys as PAGEDSERVE_<ROLE>_PUBLIC_KEY / _SECRET_KEY):
    the scheduler needs its own pair and the others' public keys, the executor and the
    clients their own pair and the scheduler's public key."""
    try:
        written = keygen_files(keys, force)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(path)


if __name__ == "__main__":
    main()
