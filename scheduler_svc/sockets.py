"""The scheduler's sockets: the client and executor ROUTERs, the admin REP and ``/metrics``."""
from __future__ import annotations

from collections.abc import Callable

import zmq

from pagedserve.common.auth import SchedulerAuth
from pagedserve.common.config import SchedulerConfig
from pagedserve.scheduler_svc.prometheus import PrometheusMetrics


class Sockets:
    """The service's sockets, bound (with CurveZMQ when ``config.auth``), and the metrics
    server when ``config.metrics_port`` is set; ``close()`` releases them all."""

    def __init__(self, config: SchedulerConfig, metrics: PrometheusMetrics):
        self.config = config
        self.ctx = zmq.Context()
        self.auth = None
        self.metrics_server = None
        try:
            if config.auth:
                self.auth = SchedulerAuth(self.ctx, config.keys)
            self.clients = self._bind(zmq.ROUTER, config.client_port, "client")
            self.executor = self._bind(zmq.ROUTER, config.executor_port, "executor")
            self.admin = self._bind(zmq.REP, config.admin_port, "admin")
            if config.metrics_port is not None:
                self.metrics_server = metrics.serve(config.host, config.metrics_port)
        except BaseException:
            self.close()
            raise

    def _bind(self, kind: int, port: int, domain: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.auth is not None:
            self.auth.secure(sock, domain)
        # libzmq drops a peer whose message is larger, before buffering it
        sock.setsockopt(zmq.MAXMSGSIZE, int(self.config.max_message_mb * (1 << 20)))
        address = f"tcp://{self.config.host}:{port}"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind {address}: {exc}") from None
        return sock

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def drain(sock: zmq.Socket, handler: Callable[[bytes, bytes], None]) -> None:
    """Hand each waiting message of a ROUTER to ``handler(peer, payload)``."""
    for _ in range(1000):  # bounded, so one busy socket cannot starve the others
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        # A ROUTER prepends the peer's identity; our peers send exactly one frame.
        handler(frames[0], frames[1] if len(frames) == 2 else b"")
