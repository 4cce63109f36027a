"""`pagedserve up`, then the client commands, exactly as a user runs them."""
import json
import signal
import subprocess

import pytest

from services import free_ports, pagedserve

pytestmark = pytest.mark.slow


def test_up_then_generate_answers_paris_and_ctrl_c_stops_both(smollm2_dir):
    client, executor, admin = free_ports(3)
    up = pagedserve("up", "--model", str(smollm2_dir), "--client-port", str(client),
                    "--executor-port", str(executor), "--admin-port", str(admin),
                    "--num-device-blocks", "256", "--num-cpu-blocks", "8", "--no-prefix-caching",
                    stdout=subprocess.PIPE, text=True,
                    # as `pagedserve up &` in a shell: a background job starts with SIGINT ignored
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert up.stdout.readline().strip() == "pagedserve ready"
        gen = pagedserve("generate", "The capital of France is", "--max-tokens", "12",
                         "--server", f"tcp://127.0.0.1:{client}", stdout=subprocess.PIPE,
                         text=True)
        assert gen.wait(timeout=120) == 0
        assert gen.stdout.read().startswith(" Paris")

        pool = pagedserve("pool", "--json", "--admin-port", str(admin), stdout=subprocess.PIPE)
        data = json.loads(pool.communicate(timeout=30)[0])
        assert {k: data["device"][k] for k in ("total", "free", "used")} == {
            "total": 256, "free": 256, "used": 0}
        assert set(data["cpu"]) >= {"total", "free", "used"}
        assert pagedserve("health", "--admin-port", str(admin),
                          stdout=subprocess.DEVNULL).wait(timeout=30) == 0
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
    # both services are gone: the admin socket no longer answers
    assert pagedserve("health", "--admin-port", str(admin), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).wait(timeout=30) == 1
