"""`pagedserve up`, then the client commands, exactly as a user runs them."""
import json
import signal
import subprocess

import httpx
import pytest

from services import Services, free_ports, model_with_defaults, pagedserve

pytestmark = pytest.mark.slow


def test_up_then_generate_answers_paris_and_down_stops_everything(smollm2_dir):
    client, executor, admin, http = free_ports(4)
    up = pagedserve("up", "--model", str(smollm2_dir), "--client-port", str(client),
                    "--executor-port", str(executor), "--admin-port", str(admin),
                    "--http-port", str(http),
                    "--num-device-blocks", "256", "--num-cpu-blocks", "8", "--no-prefix-caching",
                    stdout=subprocess.PIPE, text=True,
                    # as `pagedserve up &` in a shell: a background job starts with SIGINT ignored
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    url = f"http://127.0.0.1:{http}"
    try:
        assert up.stdout.readline().strip() == "pagedserve ready"
        assert up.stdout.readline().split() == ["http", f"{url}/v1"]
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0})
        assert "Paris" in chat.json()["choices"][0]["message"]["content"]
        gen = pagedserve("generate", "The capital of France is", "--max-tokens", "12",
                         "--temperature", "0", "--server", f"tcp://127.0.0.1:{client}",
                         stdout=subprocess.PIPE, text=True)
        assert gen.wait(timeout=120) == 0
        assert gen.stdout.read().startswith(" Paris")

        pool = pagedserve("pool", "--json", "--admin-port", str(admin), stdout=subprocess.PIPE)
        data = json.loads(pool.communicate(timeout=30)[0])
        assert {k: data["device"][k] for k in ("total", "free", "used")} == {
            "total": 256, "free": 256, "used": 0}
        assert set(data["cpu"]) >= {"total", "free", "used"}
        assert pagedserve("health", "--admin-port", str(admin),
                          stdout=subprocess.DEVNULL).wait(timeout=30) == 0
        # from another terminal: `up` ran in the background of a script, SIGINT ignored
        down = pagedserve("down", "--admin-port", str(admin), stdout=subprocess.PIPE, text=True)
        assert down.wait(timeout=60) == 0, down.stdout.read()
        assert up.wait(timeout=5) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    # the services are gone: neither the admin socket nor the gateway answers
    assert pagedserve("health", "--admin-port", str(admin), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).wait(timeout=30) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    nothing = pagedserve("down", "--admin-port", str(admin), stderr=subprocess.PIPE, text=True)
    assert nothing.wait(timeout=30) == 1 and "no `pagedserve up`" in nothing.stderr.read()


def test_generate_sends_only_the_options_given_and_the_model_sets_the_rest(smollm2_dir,
                                                                          tmp_path):
    model = model_with_defaults(smollm2_dir, tmp_path, {"temperature": 0.0, "max_new_tokens": 5})
    services = Services(model, executor_args=["--num-device-blocks", "64",
                                              "--num-cpu-blocks", "8"])

    def token_ids(*options: str) -> list[int]:
        gen = pagedserve("generate", "The capital of France is", "--json", "--server",
                         services.client, *options, stdout=subprocess.PIPE, text=True)
        out, _ = gen.communicate(timeout=120)
        assert gen.returncode == 0
        return json.loads(out)["outputs"][0]["token_ids"]

    try:
        unset = token_ids()
        assert len(unset) == 5  # the model's max_new_tokens, not a default of the CLI's
        assert unset == token_ids("--temperature", "0", "--max-tokens", "5")  # and greedy
        assert len(token_ids("--max-tokens", "3")) == 3
    finally:
        services.stop()
