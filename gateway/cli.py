"""``pagedserve gateway``: serve the OpenAI HTTP API in front of a scheduler."""
from __future__ import annotations

import importlib.util
import ipaddress
import socket

import click
import uvicorn

from pagedserve.common import options
from pagedserve.common.cli import client_keys
from pagedserve.common.client import DEFAULT_ADDRESS
from pagedserve.common.config import API_KEY_ENV, HTTP_PORT, LOOPBACK, ServiceConfig
from pagedserve.common.log import get_logger, setup_logging
from pagedserve.gateway.app import GatewaySettings, create_app

log = get_logger("gateway")


@click.command("gateway")
@click.option("--host", default=LOOPBACK, show_default=True,
              help="Address to serve HTTP on; anything but loopback needs --api-key.")
@click.option("--port", type=int, default=HTTP_PORT, show_default=True)
@click.option("--server", default=DEFAULT_ADDRESS, show_default=True,
              help="The scheduler's client endpoint.")
@click.option("--api-key", envvar=API_KEY_ENV, show_envvar=True, default=None,
              help="Bearer token that /v1/* requests must carry.")
@click.option("--scheduler-metrics", default=None, metavar="URL",
              help="The scheduler's Prometheus metrics (its --metrics-port), served after "
                   "the gateway's own at /metrics.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds of scheduler silence before a request fails.")
@lambda f: options.apply(options.AUTH_OPTIONS, f)
@options.option(ServiceConfig, "log_format")
def main(host, port, server, api_key, scheduler_metrics, timeout, auth, keys,
         log_format) -> None:
    """Serve OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics, /version) in front of the scheduler at --server."""
    if api_key is None and not is_loopback(host):
        raise click.UsageError(
            f"--host {host} serves beyond this machine: give an --api-key (or set "
            f"{API_KEY_ENV}) that clients must send, or serve on {LOOPBACK}")
    setup_logging(log_format)
    settings = GatewaySettings(server=server, keys=client_keys(auth, keys), api_key=api_key,
                               scheduler_metrics=scheduler_metrics, timeout=timeout)
    loop, http = server_implementations()
    log.info("gateway serving", host=host, port=port, loop=loop, http=http)
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, loop=loop,
                http=http, log_level="info", timeout_graceful_shutdown=5)


def server_implementations() -> tuple[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools where installed (the
    ``gateway`` extra brings both), else asyncio's loop and the pure-Python h11."""
    return ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "httptools" if importlib.util.find_spec("httptools") else "h11")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False
