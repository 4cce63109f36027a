"""Start the scheduler and executor as real processes on loopback, for end-to-end tests."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click

from benchmarks.compare import free_ports  # noqa: F401 - the tests take it from here
from common.cli import admin_request
from common.up import stop_processes

ROOT = Path(__file__).resolve().parents[1]


def pagedserve(*args: str, **kwargs) -> subprocess.Popen:
    """``pagedserve ARGS`` as a child process, run from this checkout."""
    # Each service chooses triton's interpreter itself: not inherited from the test process.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, "-m", "common.cli", *args], cwd=ROOT, env=env,
                            **kwargs)


def admin(address: str, cmd: str, timeout_s: float = 5.0, **fields) -> dict:
    """The CLI's admin request, with a silent socket as ``TimeoutError``."""
    try:
        return admin_request(cmd, address, timeout_s, **fields)
    except click.ClickException as exc:
        raise TimeoutError(exc.message) from None


def wait_ready(admin_address: str, processes: list[subprocess.Popen],
               timeout_s: float = 180.0) -> None:
    """Until the scheduler at ``admin_address`` reports a ready executor; a process that exits
    first is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if admin(admin_address, "health", 1.0)["status"] == "ready":
                return
        except TimeoutError:
            pass
        time.sleep(0.2)
    raise TimeoutError("services not ready")


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
