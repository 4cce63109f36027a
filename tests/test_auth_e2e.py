"""``--auth``: with CURVE keys from ``pagedserve keygen``, real processes serve a client that
has the client key, and a peer without the right key can neither submit, nor read the pool,
nor register as the executor."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import zmq

from pagedserve.common import protocol as p
from pagedserve.common.auth import key_pair, peer_keys, public_key
from pagedserve.common.cli import AdminEndpoint
from pagedserve.common.client import Client, ServerTimeoutError
from pagedserve.common.up import stop_processes
from pagedserve.common.sampling import SamplingParams
from services import ROOT, admin, free_ports, pagedserve, wait_ready

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(temperature=0.0, max_tokens=3)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The service's keys, and a second set that no service knows."""
    good, other = tmp_path_factory.mktemp("keys"), tmp_path_factory.mktemp("other-keys")
    for path in (good, other):
        assert pagedserve("keygen", "--keys", str(path)).wait(timeout=60) == 0
    assert oct((good / "client.key_secret").stat().st_mode & 0o777) == "0o600"
    return good, other


def test_only_peers_with_the_right_keys_get_in(smollm2_dir, keys):
    good, other = keys
    client_port, executor_port, admin_port = free_ports(3)
    client, admin_address = f"tcp://127.0.0.1:{client_port}", f"tcp://127.0.0.1:{admin_port}"
    link = f"tcp://127.0.0.1:{executor_port}"
    scheduler = pagedserve("scheduler", "--model", str(smollm2_dir), "--auth", "--keys",
                           str(good), "--client-port", str(client_port), "--executor-port",
                           str(executor_port), "--admin-port", str(admin_port))
    processes = [scheduler]
    try:
        authed = AdminEndpoint(admin_address, peer_keys("client", good))
        # An executor with keys the scheduler does not know cannot register.
        processes.append(pagedserve("executor", "--model", str(smollm2_dir), "--scheduler",
                                    link, "--auth", "--keys", str(other)))
        time.sleep(10)  # it loads the model and tries to register
        assert processes[-1].poll() is None and admin(authed, "health")["executor"] is None
        # Neither can a plain (unencrypted) one, on the raw socket.
        assert not registers(link, None)
        assert not registers(link, peer_keys("client", good))  # a client key is not enough
        # The executor with the executor key can.
        processes.append(pagedserve("executor", "--model", str(smollm2_dir), "--scheduler",
                                    link, "--auth", "--keys", str(good)))
        wait_ready(authed, processes[:1] + processes[2:])

        with Client(client, timeout=20.0, keys=peer_keys("client", good)) as ok:
            assert ok.generate("The capital of France is", PARAMS).outputs[0].text == " Paris.\n"
        for keys_ in (None, peer_keys("client", other), peer_keys("executor", good)):
            with Client(client, timeout=3.0, keys=keys_) as intruder:
                with pytest.raises(ServerTimeoutError):
                    intruder.generate("The capital of France is", PARAMS)
            with pytest.raises(TimeoutError):
                admin(AdminEndpoint(admin_address, keys_), "pool", timeout_s=3.0)
        # Keys from the environment instead of files.
        env = {f"PAGEDSERVE_CLIENT_{kind}_KEY": value.decode() for kind, value in
               (("PUBLIC", key_pair("client", good).public),
                ("SECRET", key_pair("client", good).secret))}
        env["PAGEDSERVE_SCHEDULER_PUBLIC_KEY"] = public_key("scheduler", good).decode()
        out = subprocess.run(
            [sys.executable, "-m", "pagedserve.common.cli", "generate", "--auth", "--keys",
             "/nonexistent", "--server", client, "--max-tokens", "3", "--temperature", "0",
             "The capital of France is"],
            cwd=ROOT, env={**os.environ, **env}, capture_output=True,
            text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout == " Paris.\n\n"
        assert admin(authed, "pool")["ready"]
    finally:
        stop_processes(processes, timeout_s=15)


def registers(link: str, keys) -> bool:
    """Whether a raw peer registering as an executor on ``link`` gets an answer."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A refused connection is dropped, and a DEALER's send then waits for another: when the
    # refusal comes first (a loaded machine), the send itself is the answer.
    sock.setsockopt(zmq.SNDTIMEO, 3000)
    if keys is not None:
        keys.secure(sock)
    sock.connect(link)
    try:
        sock.send(p.encode(p.RegisterExecutor(
            model="m", architecture="LlamaForCausalLM", vocab_size=49152, max_model_len=8192,
            dtype="float32", device="cpu", kv_bytes_per_token=1)))
        return bool(sock.poll(3000))
    except zmq.Again:
        return False
    finally:
        sock.close(linger=0)
