"""``pagedserve up``: run the scheduler and the executor locally as two processes."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import click

from pagedserve.common import options
from pagedserve.common.cli import AdminEndpoint, admin_request, client_keys
from pagedserve.common.config import LOOPBACK, default_model_dir, tcp_endpoint

RESTARTS_PER_MINUTE = 5


def _service(name: str, flags: list[str]) -> subprocess.Popen:
    # A new session: Ctrl-C reaches only `up`, which then stops the services in order.
    return subprocess.Popen([sys.executable, "-m", "pagedserve.common.cli", name, *flags],
                            start_new_session=True)


@click.command("up")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the executor to load the model and register.")
@lambda f: options.apply(options.SCHEDULER_OPTIONS + options.EXECUTOR_OPTIONS
                         + options.SHARED_OPTIONS, f)
def main(ready_timeout: float, **kwargs) -> None:
    """Start scheduler and executor locally, wait until ready, print the endpoints.

    Prepares the default model first if it is missing. Ctrl-C stops both services."""
    if kwargs["model"] is None and not (default_model_dir() / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pagedserve.common.cli", "prepare-model"], check=True)
    shared = options.SHARED_OPTIONS
    host = kwargs["host"]
    connect_host = LOOPBACK if host in ("0.0.0.0", "*") else host
    commands = {
        "scheduler": options.to_flags(kwargs, options.SCHEDULER_OPTIONS + shared),
        "executor": ["--scheduler", tcp_endpoint(kwargs["executor_port"], connect_host),
                     *options.to_flags(kwargs, options.EXECUTOR_OPTIONS + shared)]}
    services = [_service(name, flags) for name, flags in commands.items()]
    # Set explicitly: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        admin = AdminEndpoint(tcp_endpoint(kwargs["admin_port"], connect_host),
                              client_keys(kwargs["auth"], kwargs["keys"]))
        _wait_ready(services, admin, ready_timeout)
        click.echo(f"pagedserve ready\n"
                   f"  client    {tcp_endpoint(kwargs['client_port'], host)}\n"
                   f"  admin     {tcp_endpoint(kwargs['admin_port'], host)}\n"
                   f"  executor  {tcp_endpoint(kwargs['executor_port'], host)}\n"
                   + (f"  metrics   http://{host}:{kwargs['metrics_port']}/metrics\n"
                      if kwargs["metrics_port"] else "")
                   + "Ctrl-C stops both services.", err=False)
        _supervise(services, commands)
    except KeyboardInterrupt:
        pass
    finally:
        stop_processes(services)


def _supervise(services: list[subprocess.Popen], commands: dict[str, list[str]]) -> None:
    """Restart a service that exits, as compose's restart policy does: the scheduler then
    takes a restarted executor's sequences for lost and recomputes them; a restarted
    scheduler's clients get a retriable error, and the executor registers with it by
    itself. More than RESTARTS_PER_MINUTE restarts of one service in a minute: give up."""
    restarts: dict[str, list[float]] = {name: [] for name in commands}
    while True:
        time.sleep(0.2)
        for i, name in enumerate(commands):
            code = services[i].poll()
            if code is None:
                continue
            now = time.monotonic()
            recent = restarts[name] = [t for t in restarts[name] if now - t < 60] + [now]
            if len(recent) > RESTARTS_PER_MINUTE:
                raise click.ClickException(f"the {name} exited {len(recent)} times within a "
                                           f"minute (last code {code}): stopping")
            click.echo(f"pagedserve up: the {name} exited with code {code}; restarting it",
                       err=True)
            services[i] = _service(name, commands[name])


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _wait_ready(services: list[subprocess.Popen], admin: AdminEndpoint,
                timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s.poll() is not None for s in services):
            raise click.ClickException("a service exited during start-up (see its log above)")
        try:
            if admin_request("health", admin, timeout_s=1.0).get("status") == "ready":
                return
        except click.ClickException:
            pass
        time.sleep(0.3)
    raise click.ClickException(f"not ready after {timeout_s:g} s")


def stop_processes(services: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM each process still running, last first (executor, then scheduler); kill any
    that has not exited ``timeout_s`` later."""
    for service in reversed(services):
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
    for service in services:
        try:
            service.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
