"""``pagedserve up``: run the scheduler, the executor and the HTTP gateway locally as
processes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import click

from pagedserve.common import options
from pagedserve.common.cli import AdminEndpoint, admin_request, client_keys
from pagedserve.common.config import (API_KEY_ENV, HTTP_PORT, LOOPBACK, SchedulerConfig,
                                      cache_dir, default_model_dir, tcp_endpoint)

RESTARTS_PER_MINUTE = 5


def _service(name: str, flags: list[str]) -> subprocess.Popen:
    # A new session: Ctrl-C reaches only `up`, which then stops the services in order.
    return subprocess.Popen([sys.executable, "-m", "pagedserve.common.cli", name, *flags],
                            start_new_session=True)


@click.command("up")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the executor to load the model and register.")
@click.option("--http-port", type=int, default=HTTP_PORT, show_default=True,
              help="Port of the OpenAI-compatible HTTP gateway (on --host).")
@click.option("--no-http", is_flag=True, help="Start no HTTP gateway.")
@click.option("--api-key", envvar=API_KEY_ENV, show_envvar=True, default=None,
              help="Bearer token of the gateway's /v1/* (needed when --host is not loopback).")
@lambda f: options.apply(options.SCHEDULER_OPTIONS + options.EXECUTOR_OPTIONS
                         + options.SHARED_OPTIONS, f)
def main(ready_timeout: float, http_port: int, no_http: bool, api_key: str | None,
         **kwargs) -> None:
    """Start scheduler, executor and HTTP gateway locally, wait until ready, print the
    endpoints.

    Prepares the default model first if it is missing. Ctrl-C, or SIGTERM from another
    terminal, stops them all."""
    if kwargs["model"] is None and not (default_model_dir() / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pagedserve.common.cli", "prepare-model"], check=True)
    shared = options.SHARED_OPTIONS
    host = kwargs["host"]
    connect_host = LOOPBACK if host in ("0.0.0.0", "*") else host
    commands = {
        "scheduler": options.to_flags(kwargs, options.SCHEDULER_OPTIONS + shared),
        "executor": ["--scheduler", tcp_endpoint(kwargs["executor_port"], connect_host),
                     *options.to_flags(kwargs, options.EXECUTOR_OPTIONS + shared)]}
    if not no_http:
        commands["gateway"] = _gateway_flags(kwargs, http_port, connect_host)
        if api_key is not None:  # to the gateway by its environment: argv is public
            os.environ[API_KEY_ENV] = api_key
    # Set explicitly: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    services = [_service(name, flags) for name, flags in commands.items()]
    pid_file = _pid_file(kwargs["admin_port"])
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    try:
        admin = AdminEndpoint(tcp_endpoint(kwargs["admin_port"], connect_host),
                              client_keys(kwargs["auth"], kwargs["keys"]))
        wait_until(lambda: _executor_ready(admin), services, "the executor", ready_timeout)
        if not no_http:
            health = f"http://{connect_host}:{http_port}/health"
            wait_until(lambda: http_ready(health), services, health, ready_timeout)
        click.echo("pagedserve ready\n"
                   + (f"  http      http://{host}:{http_port}/v1\n" if not no_http else "")
                   + f"  client    {tcp_endpoint(kwargs['client_port'], host)}\n"
                   f"  admin     {tcp_endpoint(kwargs['admin_port'], host)}\n"
                   f"  executor  {tcp_endpoint(kwargs['executor_port'], host)}\n"
                   + (f"  metrics   http://{host}:{kwargs['metrics_port']}/metrics\n"
                      if kwargs["metrics_port"] else "")
                   + "Ctrl-C (or `pagedserve down` from another terminal) stops the services.",
                   err=False)
        _supervise(services, commands)
    except KeyboardInterrupt:
        pass
    finally:
        stop_processes(services)
        with contextlib.suppress(OSError):
            if pid_file.read_text() == str(os.getpid()):
                pid_file.unlink()


def _pid_file(admin_port: int) -> Path:
    """Where ``up`` notes its process id, for ``down``: one per admin port, which no two
    running ``up`` share."""
    return cache_dir() / "run" / f"up-{admin_port}.pid"


@click.command("down")
@click.option("--admin-port", type=int, default=SchedulerConfig.admin_port, show_default=True,
              help="Admin port of the `pagedserve up` to stop.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for it to stop its services and exit.")
def down(admin_port: int, timeout: float) -> None:
    """Stop a `pagedserve up` running on this machine (in the background, or in another
    terminal): it stops the gateway, the executor and the scheduler, then exits."""
    pid_file = _pid_file(admin_port)
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pid_file.unlink(missing_ok=True)
        raise click.ClickException(f"no `pagedserve up` with admin port {admin_port} is "
                                   "running here") from None
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise click.ClickException(f"`pagedserve up` (pid {pid}) still runs after "
                                       f"{timeout:g} s")
        time.sleep(0.2)
    click.echo(f"pagedserve up (pid {pid}) stopped")


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs: an exited process that its parent has not reaped yet (a
    zombie) does not."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:  # no /proc: signal 0 reached it
        return True


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


def _gateway_flags(kwargs: dict, http_port: int, connect_host: str) -> list[str]:
    """The gateway's command line: on ``--host``, a client of the scheduler started here,
    serving the scheduler's metrics at its own /metrics when they are on (the scheduler's
    metrics port must then differ from the HTTP port: both are served on ``--host``)."""
    flags = ["--host", kwargs["host"], "--port", str(http_port),
             "--server", tcp_endpoint(kwargs["client_port"], connect_host),
             "--log-format", kwargs["log_format"],
             *options.to_flags(kwargs, options.AUTH_OPTIONS)]
    metrics_port = kwargs["metrics_port"]
    if metrics_port == http_port:
        raise click.UsageError(
            f"--metrics-port {metrics_port} is the gateway's --http-port too: the gateway "
            f"serves the scheduler's metrics at http://HOST:{http_port}/metrics anyway, so "
            f"give the scheduler another --metrics-port (or leave it off)")
    if metrics_port is not None:
        flags += ["--scheduler-metrics", f"http://{connect_host}:{metrics_port}/metrics"]
    return flags


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def wait_until(ready: Callable[[], bool], services: list[subprocess.Popen], what: str,
                timeout_s: float) -> None:
    """Poll ``ready`` until it holds; a service exiting first is a failed start."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s.poll() is not None for s in services):
            raise click.ClickException("a service exited during start-up (see its log above)")
        if ready():
            return
        time.sleep(0.3)
    raise click.ClickException(f"{what} not ready after {timeout_s:g} s")


def _executor_ready(admin: AdminEndpoint) -> bool:
    try:
        return admin_request("health", admin, timeout_s=1.0).get("status") == "ready"
    except click.ClickException:
        return False


def http_ready(url: str) -> bool:
    """Whether ``url`` answers with a success status now."""
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except (OSError, urllib.error.URLError):  # refused, or a 503 before it is ready
        return False


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
