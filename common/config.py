"""Validated configuration of the two services, and where the local model cache lives.

Every field is a ``setting``: its default, its help text and, where it has them, its choices
and environment variable are written here once; ``common.options`` derives the command-line
options of ``pagedserve scheduler``, ``executor`` and ``up`` from them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from pagedserve.common.protocol import CLIENT_HEARTBEAT_S, EXECUTOR_HEARTBEAT_S, MAX_MESSAGE_MB

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
KEYS_DIR_DEFAULT = "$PAGEDSERVE_KEYS or ~/.config/pagedserve/keys"  # as common.auth.keys_dir
LOOPBACK = "127.0.0.1"
HTTP_PORT = 8000  # the gateway's (pagedserve gateway --port, pagedserve up --http-port)
API_KEY_ENV = "PAGEDSERVE_API_KEY"  # the gateway's bearer token (its --api-key)
CPU_KV_CACHE_GB = 4.0  # the KV pool without --kv-cache-gb where no profiling pass sizes it

ATTENTION_BACKENDS = ("auto", "torch", "triton")
PREEMPTION_MODES = ("auto", "swap", "recompute")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "bfloat16")
LOG_FORMATS = ("console", "json")


def cache_dir() -> Path:
    """Root of pagedserve's local cache: ``$PAGEDSERVE_CACHE`` or ``~/.cache/pagedserve``."""
    return Path(os.environ.get("PAGEDSERVE_CACHE") or Path.home() / ".cache" / "pagedserve")


def default_model_dir() -> Path:
    """The HF directory that ``pagedserve prepare-model`` writes the default model to."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def tcp_endpoint(port: int, host: str = LOOPBACK) -> str:
    """The ZeroMQ address ``tcp://HOST:PORT`` of a socket, on this machine by default."""
    return f"tcp://{host}:{port}"


def setting(default, help: str, *, choices: tuple[str, ...] = (), envvar: str | None = None,
            flag: bool = True):
    """A config field: its default, its help text, the values it may take (``choices``), the
    environment variable that sets it on the command line, and whether it is a flag at all."""
    return field(default=default, metadata={"help": help, "choices": choices, "envvar": envvar,
                                            "flag": flag})


@dataclass
class ServiceConfig:
    """Settings both services take: the model, the log format and CURVE authentication."""

    model: str | None = setting(
        None, f"HF model directory [default: the prepared {DEFAULT_MODEL_NAME}].")
    log_format: str = setting("console", "Log lines for a console, or one JSON object a line.",
                              choices=LOG_FORMATS)
    auth: bool = setting(False, "CurveZMQ on every socket: encrypted, and only peers with the "
                                "right key get in (pagedserve keygen makes the keys).")
    keys: str | None = setting(
        None, f"Keys directory for --auth [default: {KEYS_DIR_DEFAULT}]; "
              f"PAGEDSERVE_<ROLE>_PUBLIC_KEY / _SECRET_KEY override single keys.")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, "
                                 f"got {value!r}")

    def model_dir(self) -> Path:
        """The HF model directory: ``model``, or the prepared default model."""
        return Path(self.model) if self.model else default_model_dir()


@dataclass
class SchedulerConfig(ServiceConfig):
    """Settings of the scheduler service (``pagedserve scheduler``)."""

    block_size: int = setting(16, "Tokens per KV cache block (a power of two).")
    max_num_seqs: int = setting(256, "Sequences computed in one step at most.")
    max_num_batched_tokens: int = setting(
        2048, "Tokens computed in one step at most; longer prompts are split into chunks "
              "across steps.")
    max_model_len: int | None = setting(None, "Context length limit [default: the model's].")
    chat_template: str | None = setting(
        None, "Jinja chat template file that clients render chats with [default: the model's "
              "chat_template.jinja, else tokenizer_config.json's chat_template].")
    client_timeout: float = setting(
        30.0, f"Seconds a client with live requests may stay silent (clients send a heartbeat "
              f"every {CLIENT_HEARTBEAT_S:g} s) before it is taken for gone and its requests "
              f"are aborted.")
    executor_timeout: float = setting(
        1.5, f"Seconds the registered executor may stay silent (it sends a heartbeat every "
             f"{EXECUTOR_HEARTBEAT_S:g} s, even mid-step) before it is taken for dead: its "
             f"running and swapped sequences wait to be recomputed on the next executor that "
             f"registers.")
    max_message_mb: float = setting(
        MAX_MESSAGE_MB, "Largest message the scheduler accepts on any socket; a peer that "
                        "sends a larger one is disconnected before it is read into memory.")
    max_waiting: int = setting(
        4096, "Requests queued before admission at most; beyond it new requests get an "
              "'overloaded' error instead of growing memory without bound.")
    preemption_mode: str = setting(
        "auto", "When blocks run out: swap the latest arrival to CPU memory, recompute it "
                "later, or choose per preemption by measured cost.", choices=PREEMPTION_MODES)
    enable_prefix_caching: bool = setting(
        True, "Reuse the KV of full blocks whose tokens were computed before.")
    async_scheduling: bool = setting(
        True, "While a step runs, build and send the next one when it only continues the "
              "same decodes, so that the executor never waits for the scheduler between "
              "such steps.")
    host: str = setting(LOOPBACK, "Address the scheduler's sockets bind to.")
    client_port: int = setting(5555, "Port of the client socket (requests and their outputs).")
    executor_port: int = setting(5556, "Port of the socket the executor registers on.")
    admin_port: int = setting(5557, "Port of the scheduler's admin socket (health, pool, "
                                    "seqs, seq, stats).")
    metrics_port: int | None = setting(
        None, "Serve Prometheus metrics at http://HOST:PORT/metrics [default: off].")
    log_stats_interval: float = setting(
        5.0, "Seconds between status log lines while busy (throughput, queues, KV usage, "
             "prefix hit rate); 0 turns them off.")
    # Not a flag: a margin inside admission, as in vLLM, that a deployment has no reason to move.
    watermark: float = setting(0.01, "Fraction of device blocks kept free when admitting.",
                               flag=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_waiting", self.max_waiting)
        _positive("client_timeout", self.client_timeout)
        _positive("executor_timeout", self.executor_timeout)
        _positive("max_message_mb", self.max_message_mb)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_or_none("max_model_len", self.max_model_len)
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        for name in ("client_port", "executor_port", "admin_port"):
            _port(name, getattr(self, name))
        if self.metrics_port is not None:
            _port("metrics_port", self.metrics_port)
        if isinstance(self.log_stats_interval, bool) or not isinstance(
                self.log_stats_interval, (int, float)) or self.log_stats_interval < 0:
            raise ValueError(f"log_stats_interval must be a number of seconds >= 0 (0 turns "
                             f"the status line off), got {self.log_stats_interval!r}")


@dataclass
class ExecutorConfig(ServiceConfig):
    """Settings of the executor service (``pagedserve executor``)."""

    scheduler: str = setting(tcp_endpoint(SchedulerConfig.executor_port),
                             "The scheduler's executor endpoint.")
    device: str = setting("cpu", "cpu, cuda or cuda:N.")
    dtype: str = setting(
        "auto", "Weights and KV cache dtype. auto: on a CPU, bfloat16 where it computes bfloat16 "
                "natively (AVX512_BF16 or AMX) unless measured slower there than float32, "
                "float32 elsewhere; on CUDA the checkpoint's half precision.", choices=DTYPES)
    kv_cache_dtype: str = setting(
        "auto", "KV cache dtype (auto: the weights'). bfloat16 under float32 weights holds "
                "twice the tokens in the same memory and halves what decode attention reads; "
                "keys and values are rounded to bfloat16, so outputs may differ from "
                "float32's. Needs the torch attention backend (the CPU's).",
        choices=KV_CACHE_DTYPES)
    kv_cache_gb: float | None = setting(
        None, f"KV pool size in GiB [default: {CPU_KV_CACHE_GB:g} on CPU; CUDA: what the "
              f"profiling pass leaves].")
    num_device_blocks: int | None = setting(
        None, "KV pool size in blocks (instead of --kv-cache-gb).")
    gpu_memory_utilization: float = setting(
        0.9, "CUDA: fraction of the card's memory to use (weights, activations and the KV "
             "pool).")
    swap_space_gb: float = setting(4.0, "CPU swap space for preempted sequences, in GiB.")
    num_cpu_blocks: int | None = setting(
        None, "CPU swap space in blocks (instead of --swap-space-gb).")
    attention_backend: str = setting(
        "auto", "auto: triton on CUDA, torch on CPU (triton on CPU runs in triton's "
                "interpreter: for tests).", choices=ATTENTION_BACKENDS)
    enforce_eager: bool = setting(
        False, "Run every step eagerly: no CUDA graphs for decode steps (on CUDA with triton "
               "attention, pure-decode steps replay a graph per batch size).")
    overlap_steps: str = setting(
        "auto", "Launch a step the scheduler sent ahead while the step before it still runs on "
                "the device, its sampled tokens fed to the next step there, so that the "
                "device does not wait on the host between steps. auto: on CUDA without "
                "tensor parallelism (on a CPU the work is synchronous: nothing to overlap).",
        choices=("auto", "on", "off"))
    tensor_parallel_size: int = setting(
        1, "Shard the model's heads and MLP over this many executor processes (ranks), which "
           "sum their partial results with all-reduces (gloo on CPU, NCCL on CUDA). Without "
           "--tp-rank the executor starts the other ranks on this machine itself.")
    tp_rank: int | None = setting(
        None, "This process's rank, for ranks started one by one (across machines): rank 0 "
              "talks to the scheduler, the others only to rank 0. Needs --tp-master.",
        envvar="PAGEDSERVE_TP_RANK")
    tp_master: str | None = setting(
        None, "HOST:PORT where rank 0 runs the group's rendezvous; every rank passes the same "
              "one.", envvar="PAGEDSERVE_TP_MASTER")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.kv_cache_gb is not None and self.num_device_blocks is not None:
            raise ValueError("give kv_cache_gb or num_device_blocks, not both")
        _positive_or_none("kv_cache_gb", self.kv_cache_gb)
        _positive_or_none("num_device_blocks", self.num_device_blocks)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.swap_space_gb < 0:
            raise ValueError(f"swap_space_gb must be >= 0, got {self.swap_space_gb}")
        if self.num_cpu_blocks is not None and self.num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0, got {self.num_cpu_blocks}")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.tp_rank is not None:
            if not 0 <= self.tp_rank < self.tensor_parallel_size:
                raise ValueError(f"tp_rank {self.tp_rank} is outside [0, "
                                 f"{self.tensor_parallel_size}) (tensor_parallel_size)")
            if self.tp_master is None:
                raise ValueError("tp_rank needs tp_master (HOST:PORT of rank 0's rendezvous)")
        if self.tp_master is not None and not self.tp_master.rpartition(":")[2].isdigit():
            raise ValueError(f"tp_master must be HOST:PORT, got {self.tp_master!r}")

    def resolved_attention_backend(self) -> str:
        """``auto``: the Triton kernels on CUDA; on CPU torch's fused attention (the kernels
        would run in triton's interpreter, exact but slow)."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return "torch" if self.device == "cpu" else "triton"

    def resolved_kv_cache_gb(self) -> float:
        """The KV pool size in GiB where no profiling pass measures it: ``kv_cache_gb``, or
        ``CPU_KV_CACHE_GB`` when it is not given."""
        return self.kv_cache_gb if self.kv_cache_gb is not None else CPU_KV_CACHE_GB


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _positive_or_none(name: str, value) -> None:
    if value is not None:
        _positive(name, value)


def _port(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{name} must be a TCP port in 1..65535, got {value!r}")
