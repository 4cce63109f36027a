"""The CLI's admin request gives up in time, even where the scheduler refuses the connection."""
import threading
import time

import click
import zmq

from pagedserve.common.auth import SchedulerAuth, keygen, peer_keys
from pagedserve.common.cli import AdminEndpoint, admin_request
from services import free_ports


def test_a_refused_peer_gets_a_clear_error_within_the_timeout(tmp_path, monkeypatch):
    """An executor's keys on the admin socket: ZAP refuses them, the connection is dropped,
    and a REQ socket's send then waits for one that never comes. The refusal is made to land
    before the send (as it does on a loaded machine) by a pause after connecting."""
    keygen(tmp_path)
    ctx = zmq.Context()
    auth = SchedulerAuth(ctx, tmp_path)
    admin = ctx.socket(zmq.REP)
    auth.secure(admin, "admin")
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    admin.bind(address)
    connect = zmq.Socket.connect

    def connect_then_wait(sock, addr):
        connect(sock, addr)
        time.sleep(0.5)

    monkeypatch.setattr(zmq.Socket, "connect", connect_then_wait)
    outcome = {}

    def ask():
        try:
            admin_request("pool", AdminEndpoint(address, peer_keys("executor", tmp_path)),
                          timeout_s=1.0)
        except click.ClickException as exc:
            outcome["error"] = exc.message

    try:
        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the admin request hung"
        assert "no reply from the admin socket" in outcome["error"]
    finally:
        admin.close(linger=0)
        auth.stop()
        ctx.destroy(linger=0)
