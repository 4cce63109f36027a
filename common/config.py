"""Validated configuration of the two services, and where the local model cache lives."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pagedserve.common.protocol import MAX_MESSAGE_MB

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Root of pagedserve's local cache: ``$PAGEDSERVE_CACHE`` or ``~/.cache/pagedserve``."""
    return Path(os.environ.get("PAGEDSERVE_CACHE") or Path.home() / ".cache" / "pagedserve")


def default_model_dir() -> Path:
    """The HF directory that ``pagedserve prepare-model`` writes the default model to."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


@dataclass
class SchedulerConfig:
    """Settings of the scheduler service (``pagedserve scheduler``)."""

    model: str | None = None            # HF model directory: tokenizer and context limits
    block_size: int = 16                # tokens per KV block
    max_num_seqs: int = 256             # sequences in one step at most
    max_waiting: int = 4096             # requests queued before admission at most
    client_timeout: float = 30.0        # silence after which a client's requests are aborted
    executor_timeout: float = 1.5       # silence after which the executor is taken for dead
    max_message_mb: float = MAX_MESSAGE_MB  # larger messages on any scheduler socket: cut off
    max_num_batched_tokens: int = 2048  # tokens in one step (prompts are chunked)
    max_model_len: int | None = None    # context limit; default the model's own
    watermark: float = 0.01             # fraction of device blocks kept free when admitting
    preemption_mode: str = "auto"       # auto | swap | recompute
    enable_prefix_caching: bool = True
    async_scheduling: bool = True       # build the next decode step while one runs
    host: str = "127.0.0.1"
    client_port: int = 5555
    executor_port: int = 5556
    admin_port: int = 5557
    metrics_port: int | None = None     # Prometheus /metrics over HTTP; None: off
    log_stats_interval: float = 5.0     # seconds between status log lines; 0: off
    log_format: str = "console"
    auth: bool = False                  # CURVE on every socket (common.auth)
    keys: str | None = None             # keys directory for --auth (default: common.auth)

    def __post_init__(self) -> None:
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
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")
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
        _log_format(self.log_format)

    def model_dir(self) -> Path:
        return Path(self.model) if self.model else default_model_dir()


@dataclass
class ExecutorConfig:
    """Settings of the executor service (``pagedserve executor``)."""

    model: str | None = None
    scheduler: str = "tcp://127.0.0.1:5556"
    device: str = "cpu"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"        # auto: the model's dtype
    kv_cache_gb: float | None = None    # CPU device: KV pool size (default 4 GiB)
    num_device_blocks: int | None = None
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the card's memory to use
    swap_space_gb: float = 4.0
    num_cpu_blocks: int | None = None
    attention_backend: str = "auto"     # auto: triton on CUDA, torch on CPU
    enforce_eager: bool = False         # CUDA + triton: no decode graphs
    tensor_parallel_size: int = 1
    tp_rank: int | None = None          # None: rank 0, starting the other ranks locally
    tp_master: str | None = None        # HOST:PORT of the rendezvous (rank 0's)
    log_format: str = "console"
    auth: bool = False                  # CURVE to the scheduler (common.auth)
    keys: str | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
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
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.tp_rank is not None:
            if not 0 <= self.tp_rank < self.tensor_parallel_size:
                raise ValueError(f"tp_rank {self.tp_rank} is outside [0, "
                                 f"{self.tensor_parallel_size}) (tensor_parallel_size)")
            if self.tp_master is None:
                raise ValueError("tp_rank needs tp_master (HOST:PORT of rank 0's rendezvous)")
        if self.tp_master is not None and not self.tp_master.rpartition(":")[2].isdigit():
            raise ValueError(f"tp_master must be HOST:PORT, got {self.tp_master!r}")
        _log_format(self.log_format)

    def model_dir(self) -> Path:
        return Path(self.model) if self.model else default_model_dir()

    def resolved_attention_backend(self) -> str:
        """``auto``: the Triton kernels on CUDA; on CPU torch's fused attention (the kernels
        would run in triton's interpreter, exact but slow)."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return "torch" if self.device == "cpu" else "triton"


ATTENTION_BACKENDS = ("auto", "torch", "triton")
PREEMPTION_MODES = ("auto", "swap", "recompute")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "bfloat16")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _positive_or_none(name: str, value) -> None:
    if value is not None:
        _positive(name, value)


def _port(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{name} must be a TCP port in 1..65535, got {value!r}")


def _log_format(value: str) -> None:
    if value not in ("json", "console"):
        raise ValueError(f"log_format must be json or console, got {value!r}")
