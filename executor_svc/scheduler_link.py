"""The executor's link to the scheduler: its socket, the registration handshake, and the
heartbeat thread that notices when the scheduler is gone.

A thread sends a heartbeat every ``EXECUTOR_HEARTBEAT_S`` on a socket of its own, mid-step too,
so that the scheduler notices a dead executor within its ``--executor-timeout``. Heard back
from nobody for ``SCHEDULER_TIMEOUT_S`` while registered (the scheduler died or restarted, or
took this executor for dead), the link is ``lost``: the executor drops its state and registers
again.
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid

import zmq

from pagedserve.common import protocol as p
from pagedserve.common.auth import peer_keys
from pagedserve.common.config import ExecutorConfig
from pagedserve.common.log import get_logger

log = get_logger("executor")
REGISTER_RETRY_MS = 2000
SCHEDULER_TIMEOUT_S = 3.0


class SchedulerLink:
    """A DEALER socket to ``config.scheduler`` under one identity for the process's life,
    its heartbeat thread running until ``stopping`` is set."""

    def __init__(self, config: ExecutorConfig, stopping: threading.Event):
        self.address = config.scheduler
        self.identity = f"executor-{uuid.uuid4().hex[:12]}".encode()
        self.keys = peer_keys("executor", config.keys) if config.auth else None
        self.stopping = stopping
        self.ctx = zmq.Context()
        self.sock = self._connect(self.identity)
        self._registered = threading.Event()  # set while the scheduler knows us
        self._lost = threading.Event()  # set by the heartbeat thread: the scheduler is gone
        self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                           name="executor-heartbeat")
        self._heartbeat.start()

    @property
    def lost(self) -> bool:
        """Whether the scheduler went silent while this executor was registered."""
        return self._lost.is_set()

    def register(self, announce: p.RegisterExecutor) -> p.ConfigureExecutor | None:
        """Send ``announce`` until the scheduler answers with its configuration; None once
        ``stopping`` is set."""
        register = p.encode(announce)
        log.info("registering with scheduler", scheduler=self.address)
        while not self.stopping.is_set():
            self.sock.send(register)
            deadline = time.monotonic() + REGISTER_RETRY_MS / 1000
            while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
                if not self.sock.poll(int(left * 1000) + 1):
                    continue
                try:
                    msg = p.decode(self.sock.recv())
                except p.ProtocolError as exc:
                    log.error("bad message from scheduler", error=str(exc))
                    continue
                if isinstance(msg, p.ConfigureExecutor):
                    return msg
                if isinstance(msg, p.ErrorMsg) and msg.code == "unavailable":
                    log.warning("scheduler busy, registering again", reason=msg.message)
                    time.sleep(REGISTER_RETRY_MS / 1000)
                    break
                if isinstance(msg, p.ErrorMsg):
                    raise RuntimeError(f"scheduler refused registration: {msg.message}")
                # a plan meant for before a restart: nothing to answer
        return None

    @contextlib.contextmanager
    def registered(self):
        """While the scheduler knows this executor: its silence counts as loss."""
        self._lost.clear()
        self._registered.set()
        try:
            yield
        finally:
            self._registered.clear()

    def send(self, msg) -> None:
        self.sock.send(p.encode(msg))

    def receive(self, timeout_ms: int) -> bytes | None:
        """The next message, or None after ``timeout_ms`` without one."""
        return self.sock.recv() if self.sock.poll(timeout_ms) else None

    def close(self) -> None:
        """Stop the heartbeat (``stopping`` must be set) and close the sockets."""
        self._heartbeat.join()
        self.ctx.destroy(linger=0)

    def _connect(self, identity: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        if self.keys is not None:
            self.keys.secure(sock)
        sock.connect(self.address)
        return sock

    def _beat(self) -> None:
        """Heartbeats to the scheduler; silence back while registered sets ``_lost``."""
        sock = self._connect(self.identity + p.HEARTBEAT_SUFFIX)
        beat = p.encode(p.Heartbeat())
        heard = time.monotonic()
        try:
            while not self.stopping.is_set():
                sock.send(beat)
                deadline = time.monotonic() + p.EXECUTOR_HEARTBEAT_S
                while (left := deadline - time.monotonic()) > 0:
                    if sock.poll(int(left * 1000) + 1):
                        sock.recv()
                        heard = time.monotonic()
                if not self._registered.is_set():
                    heard = time.monotonic()  # only silence after registering counts
                elif time.monotonic() - heard > SCHEDULER_TIMEOUT_S:
                    self._lost.set()
        finally:
            sock.close(linger=0)
