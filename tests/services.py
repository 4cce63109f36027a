"""Start the scheduler and executor as real processes on loopback, for end-to-end tests."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import click
import httpx
import pytest

from pagedserve.benchmarks.compare import free_ports  # noqa: F401 - the tests take it from here
from pagedserve.common.cli import admin_request
from pagedserve.common.client import Client
from pagedserve.common.up import stop_processes

ROOT = Path(__file__).resolve().parents[1]


def pagedserve(*args: str, **kwargs) -> subprocess.Popen:
    """``pagedserve ARGS`` as a child process, run from this checkout; ``env`` adds to the
    environment."""
    # Each service chooses triton's interpreter itself: not inherited from the test process.
    env = {**os.environ, **kwargs.pop("env", {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, "-m", "pagedserve.common.cli", *args], cwd=ROOT,
                            env=env, **kwargs)


def admin(address: str, cmd: str, timeout_s: float = 5.0, **fields) -> dict:
    """The CLI's admin request, with a silent socket as ``TimeoutError``."""
    try:
        return admin_request(cmd, address, timeout_s, **fields)
    except click.ClickException as exc:
        raise TimeoutError(exc.message) from None


def wait_until(ready: Callable[[], bool], processes: list[subprocess.Popen], timeout_s: float,
               what: str) -> None:
    """Until ``ready()`` holds; a process that exits first is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready")


def wait_ready(admin_address: str, processes: list[subprocess.Popen],
               timeout_s: float = 180.0) -> None:
    """Until the scheduler at ``admin_address`` reports a ready executor; a process that exits
    first is an error."""
    def ready() -> bool:
        try:
            return admin(admin_address, "health", 1.0)["status"] == "ready"
        except TimeoutError:
            return False
    wait_until(ready, processes, timeout_s, "services")


def wait_http(url: str, processes: list[subprocess.Popen], timeout_s: float = 60.0) -> None:
    """Until ``url`` answers 200; a process that exits first is an error."""
    def ready() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False
    wait_until(ready, processes, timeout_s, url)


class Services:
    """A scheduler and an executor process; ``stop()`` ends both. ``scheduler_stderr``: a
    file for the scheduler's log (default: inherited)."""

    def __init__(self, model: str | Path, scheduler_args=(), executor_args=(),
                 ready_timeout: float = 180.0, scheduler_stderr=None):
        client, executor, admin_port = free_ports(3)
        self.client = f"tcp://127.0.0.1:{client}"
        self.admin = f"tcp://127.0.0.1:{admin_port}"
        self.executor_link = f"tcp://127.0.0.1:{executor}"
        self.scheduler = pagedserve(
            "scheduler", "--model", str(model), "--client-port", str(client),
            "--executor-port", str(executor), "--admin-port", str(admin_port),
            *scheduler_args, stderr=scheduler_stderr)
        self.executor = pagedserve(
            "executor", "--model", str(model), "--scheduler", f"tcp://127.0.0.1:{executor}",
            *executor_args)
        try:
            wait_ready(self.admin, [self.scheduler, self.executor], ready_timeout)
        except BaseException:
            self.stop()
            raise

    def pool(self) -> dict:
        return admin(self.admin, "pool")

    def admin_cmd(self, cmd: str, **fields) -> dict:
        return admin(self.admin, cmd, **fields)

    def stop(self) -> None:
        stop_processes([self.scheduler, self.executor], timeout_s=15)


def model_with_defaults(model_dir: Path, path: Path, defaults: dict) -> Path:
    """``model_dir``'s files linked into ``path``, with ``defaults`` added to its
    generation_config.json: the model's defaults for what a request leaves unset."""
    for file in model_dir.iterdir():
        if file.name != "generation_config.json":
            (path / file.name).symlink_to(file)
    config = json.loads((model_dir / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **defaults}))
    return path


def services_fixtures(client_timeout_s: float, num_device_blocks: int,
                      executor_args: tuple[str, ...] = ()):
    """A test module's ``services`` and ``client`` fixtures: the default model's scheduler
    (``--client-timeout client_timeout_s``) and executor (``num_device_blocks`` device blocks,
    16 CPU blocks; float32, as the transformers outputs they are compared with, where dtype
    auto would be bfloat16; then ``executor_args``), started once for the module, and a
    ``Client`` of them."""

    @pytest.fixture(scope="module")
    def services(smollm2_dir):
        svc = Services(smollm2_dir, scheduler_args=["--client-timeout", str(client_timeout_s)],
                       executor_args=["--num-device-blocks", str(num_device_blocks),
                                      "--num-cpu-blocks", "16", "--dtype", "float32",
                                      *executor_args])
        yield svc
        svc.stop()

    @pytest.fixture(scope="module")
    def client(services):
        with Client(services.client, timeout=60.0) as c:
            yield c

    return services, client


@contextlib.contextmanager
def up(model: str | Path, log_path: Path, *args: str):
    """``pagedserve up --model MODEL ARGS`` on free ports, its output in ``log_path``; yields
    it (``proc``, ``client``, ``admin``, ``http``: the gateway's URL, ``log``) once ready by
    its own account too. On exit its log's tail is printed (pytest shows it for a failed
    test) and it is stopped."""
    client, executor, admin_port, http = free_ports(4)
    with open(log_path, "w") as log:
        proc = pagedserve("up", "--model", str(model), "--client-port", str(client),
                          "--executor-port", str(executor), "--admin-port", str(admin_port),
                          "--http-port", str(http), *args, stdout=log, stderr=subprocess.STDOUT)
    services = SimpleNamespace(proc=proc, client=f"tcp://127.0.0.1:{client}",
                               admin=f"tcp://127.0.0.1:{admin_port}",
                               http=f"http://127.0.0.1:{http}", log=log_path)
    try:
        wait_ready(services.admin, [proc])
        # up itself polls for readiness: until it says so, a service exiting is a failed start
        deadline = time.monotonic() + 30
        while "pagedserve ready" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield services
    finally:
        print(log_path.read_text()[-8000:])
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child(parent: int, role: str) -> int:
    """The pid of ``parent``'s child process whose command line has the word ``role``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and role.encode() in argv:
            return int(entry.name)
    raise LookupError(f"no {role} under process {parent}")
