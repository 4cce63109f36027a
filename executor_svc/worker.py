"""The executor's model side: the model loaded on its device and, while the executor is
registered, the KV cache and model runner that the scheduler's configuration sizes.

With ``--tensor-parallel-size N`` this process is one rank (``executor_svc.parallel``): rank
0's worker has the other ranks do what it does (configure, run a plan, drop, trim, stop), and
theirs ``follow``.
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import torch

from pagedserve.common import protocol as p
from pagedserve.common.config import ExecutorConfig
from pagedserve.common.log import get_logger
from pagedserve.executor_svc import backends
from pagedserve.executor_svc.autotune import Tuner
from pagedserve.executor_svc.backends.tuned import choose_dtype
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.cpu_features import BF16_NATIVE, CpuInfo, cpu_info
from pagedserve.executor_svc.cpu_memory import (bound_primitive_cache, release_free_memory,
                                                tune_allocator)
from pagedserve.executor_svc.model import load_model
from pagedserve.executor_svc.model_config import ModelConfig
from pagedserve.executor_svc.model_runner import ModelRunner, PlanError
from pagedserve.executor_svc.parallel import Command, TensorParallel
from pagedserve.executor_svc.step_pipeline import StepPipeline

log = get_logger("executor")
GIB = 1 << 30


class DtypeChoice(NamedTuple):
    """The weights' dtype and why: ``"bfloat16 (auto: amx_bf16)"``, for the log and
    ``backends.chosen``."""

    dtype: torch.dtype
    reason: str


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device,
                  cpu: CpuInfo | None = None, tuner: Tuner | None = None) -> DtypeChoice:
    """``auto`` on a CPU (``cpu``: this one): bfloat16 where it computes bfloat16 natively
    (``CpuInfo.native_bf16``), float32 elsewhere (exact, and the reference for tests); with a
    ``tuner``, float32 also where bfloat16's layers measure slower here
    (``tuned.choose_dtype``). On CUDA the checkpoint's half-precision dtype, with float32
    checkpoints served in bfloat16."""
    if name != "auto":
        return DtypeChoice(getattr(torch, name), f"{name} (--dtype)")
    if device.type != "cpu":
        dtype = (model_config.torch_dtype if model_config.torch_dtype != torch.float32
                 else torch.bfloat16)
        return DtypeChoice(dtype, f"{_name(dtype)} (auto: CUDA, checkpoint in "
                                  f"{_name(model_config.torch_dtype)})")
    native = (cpu or cpu_info()).native_bf16()
    if native is None:
        return DtypeChoice(torch.float32, f"float32 (auto: no {' or '.join(BF16_NATIVE)})")
    if tuner is not None and choose_dtype(tuner, model_config) == "float32":
        return DtypeChoice(torch.float32, f"float32 (auto: {native}, but bfloat16 measured "
                                          f"slower here)")
    return DtypeChoice(torch.bfloat16, f"bfloat16 (auto: {native})")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_kv_dtype(name: str, dtype: torch.dtype, attention: str) -> torch.dtype:
    """The KV cache's dtype: ``auto``, the weights' ``dtype``. Another needs the torch
    attention backend (the CPU kernels read a bfloat16 cache under float32 queries; the
    triton kernels read the cache in the queries' dtype)."""
    kv_dtype = dtype if name == "auto" else getattr(torch, name)
    if kv_dtype != dtype and attention != "torch":
        raise ValueError(f"--kv-cache-dtype {name} under {str(dtype).removeprefix('torch.')} "
                         f"weights needs --attention-backend torch, not {attention}")
    return kv_dtype


class Worker:
    """The model of ``config`` on its device; ``start`` sets up a KV cache and runner for a
    configuration, ``execute`` runs plans on them, ``drop`` forgets both."""

    def __init__(self, config: ExecutorConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.model_dir = str(config.model_dir())
        model_config = ModelConfig.from_model_dir(self.model_dir)
        # On a CPU each op is the fastest measured here, once per machine (autotune).
        self.tuner = tuner = Tuner.for_machine() if self.device.type == "cpu" else None
        start = time.perf_counter()
        self.dtype, self.dtype_reason = resolve_dtype(config.dtype, model_config, self.device,
                                                      tuner=tuner)
        log.info("dtype chosen", dtype=self.dtype_reason)
        self.attention = config.resolved_attention_backend()
        _check_attention(self.attention, self.device)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype, self.attention)
        if self.device.type == "cpu":
            _tune_cpu_memory()
        self.tp = _join_group(config, model_config, self.device)
        log.info("loading model", model=self.model_dir, dtype=str(self.dtype),
                 device=str(self.device), attention=self.attention, tp_rank=config.tp_rank,
                 tensor_parallel_size=config.tensor_parallel_size)
        self.model = load_model(self.model_dir, self.dtype, self.device, tp=self.tp,
                                tuner=tuner)
        if self.device.type == "cpu":
            release_free_memory()
        log.info("model loaded", layer_ops=self.model.ops.name,
                 seconds=round(time.perf_counter() - start, 1))
        self.runner: ModelRunner | None = None
        self.steps: StepPipeline | None = None  # the runner's, in order
        # Steps launched ahead of the one in flight (StepPipeline): never under tensor
        # parallelism, whose ranks share each step's tokens on the host.
        self.overlaps = self.tp is None and (config.overlap_steps == "on" or (
            config.overlap_steps == "auto" and self.device.type == "cuda"))

    @property
    def is_driver(self) -> bool:
        """Whether this process talks to the scheduler: rank 0, or the only process."""
        return self.tp is None or self.tp.is_driver

    def registration(self) -> p.RegisterExecutor:
        """What the executor announces: its model's shape and what a token's KV costs."""
        config = self.model.config  # this rank's share of the heads
        return p.RegisterExecutor(
            model=self.model_dir, architecture=config.architecture,
            vocab_size=config.vocab_size, max_model_len=config.max_model_len,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
            kv_bytes_per_token=CacheEngine.bytes_per_block(config, 1, self.kv_dtype))

    def start(self, configure: p.ConfigureExecutor) -> p.ExecutorReady:
        """Size and allocate the KV cache for ``configure`` and make a runner over it."""
        self._tell(Command.CONFIGURE, p.encode(configure))
        num_device, num_cpu = self._num_device_blocks(configure), self._num_cpu_blocks(configure)
        if self.tp is not None:  # the same block ids on every rank: the smallest pool
            num_device, num_cpu = self.tp.min(num_device), self.tp.min(num_cpu)
        cache = CacheEngine(self.model.config, configure.block_size, num_device, num_cpu,
                            self.kv_dtype, self.device)
        self.runner = ModelRunner(self.model, cache, configure.block_size, self.attention,
                                  self.tuner)
        self.steps = StepPipeline(self.runner, self.overlaps)
        # Not yet under tensor parallelism: capturing its all-reduces is untested.
        if (self.device.type == "cuda" and self.attention == "triton"
                and not self.config.enforce_eager and self.tp is None):
            self._capture_graphs(configure)
        kernels = backends.chosen(self.model, self.runner.attention, self.runner.sampler.ops,
                                  self.dtype_reason)
        kernels["block_ops"] = cache.describe()
        kernels["overlap_steps"] = "on" if self.overlaps else "off"
        log.info("KV cache ready", device_blocks=num_device, cpu_blocks=num_cpu,
                 block_size=configure.block_size,
                 kv_dtype=str(self.kv_dtype).removeprefix("torch."), **kernels)
        return p.ExecutorReady(num_device_blocks=num_device, num_cpu_blocks=num_cpu,
                               kernels=kernels)

    def submit(self, payload: bytes) -> list[p.StepResult | p.ErrorMsg]:
        """Launch the encoded plan ``payload`` (``StepPipeline``); the replies due now, in
        order: a step that it went ahead of, or that finished first, and its own unless it
        stays in flight. A plan that fails validation is answered by an ``invalid_request``
        error in its place (nothing of it was applied). A failure once the plan was applied
        raises the runner's ``ExecutorFault``."""
        try:
            plan = p.decode(payload, (p.StepPlan,))
            self._tell(Command.PLAN, payload)
            self.steps.submit(plan)
        except (p.ProtocolError, PlanError) as exc:
            log.error("rejected plan", error=str(exc))
            self.steps.flush()
            return [*self.steps.take(), p.ErrorMsg(code="invalid_request", message=str(exc))]
        return self.steps.take()

    def flush(self) -> list[p.StepResult]:
        """The result of the step in flight, if one is (once the device is done with it)."""
        self.steps.flush()
        return self.steps.take()

    def drop(self) -> None:
        """Forget every sequence and the KV cache."""
        self._tell(Command.DROP)
        self.runner = self.steps = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def trim(self) -> None:
        """Idle: give back what the allocator kept for the steps (``cpu_memory`` keeps up to
        1 GiB of freed memory in the heap while busy)."""
        release_free_memory()
        self._tell(Command.TRIM)

    def close(self) -> None:
        """Stop the other ranks, if any, and leave the group."""
        self._tell(Command.STOP)
        if self.tp is not None:
            self.tp.close()

    def follow(self) -> None:
        """A rank other than 0: do what rank 0 says, in lockstep with it, until it stops."""
        while True:
            command, payload = self.tp.receive()
            if command is Command.CONFIGURE:
                self.start(p.decode(payload, (p.ConfigureExecutor,)))
            elif command is Command.PLAN:
                self.submit(payload)  # rank 0 answers the scheduler
            elif command is Command.DROP:
                self.drop()
            elif command is Command.TRIM:
                release_free_memory()
            else:
                self.tp.close()
                log.info("executor rank stopped", tp_rank=self.tp.rank)
                return

    def _tell(self, command: Command, payload: bytes = b"") -> None:
        """Rank 0: have the other ranks do the same (nothing without tensor parallelism)."""
        if self.tp is not None and self.tp.is_driver:
            self.tp.send(command, payload)

    def _capture_graphs(self, configure: p.ConfigureExecutor) -> None:
        start = time.perf_counter()
        self.runner.use_decode_graphs(configure.max_num_seqs, configure.max_model_len)
        log.info("decode graphs captured", batch_sizes=len(self.runner.graphs.buckets),
                 max_batch=self.runner.graphs.max_batch,
                 seconds=round(time.perf_counter() - start, 1))

    def _num_cpu_blocks(self, configure: p.ConfigureExecutor) -> int:
        if self.config.num_cpu_blocks is not None:
            return self.config.num_cpu_blocks
        return CacheEngine.num_blocks_for_bytes(self.model.config, configure.block_size,
                                                self.kv_dtype,
                                                int(self.config.swap_space_gb * GIB))

    def _num_device_blocks(self, configure: p.ConfigureExecutor) -> int:
        if self.config.num_device_blocks is not None:
            return self.config.num_device_blocks
        if self.device.type == "cuda" and self.config.kv_cache_gb is None:
            free_bytes = self._profile_cuda(configure)
        else:
            free_bytes = int(self.config.resolved_kv_cache_gb() * GIB)
        # Less one: the cache adds its null block.
        num = CacheEngine.num_blocks_for_bytes(self.model.config, configure.block_size,
                                               self.kv_dtype, free_bytes) - 1
        if num < 1:
            raise RuntimeError(f"no memory left for the KV cache ({free_bytes} bytes)")
        return num

    def _profile_cuda(self, configure: p.ConfigureExecutor) -> int:
        """Run the largest step the scheduler may send and keep what memory is left."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = configure.max_num_batched_tokens
        blocks = -(-tokens // configure.block_size)
        scratch = CacheEngine(self.model.config, configure.block_size, blocks, 0, self.kv_dtype,
                              self.device)
        runner = ModelRunner(self.model, scratch, configure.block_size, self.attention,
                             self.tuner)
        plan = p.StepPlan(
            step=0, removed=[], seq_ids=[0], num_tokens=[tokens], block_appends=[],
            new_seqs=[p.NewSeq(seq_id=0, token_ids=[0] * tokens,
                               block_table=list(range(blocks)), params={"temperature": 0.0})])
        runner.execute(p.decode(p.encode(plan)))  # as a plan arrives: arrays, not lists
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del runner, scratch
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * self.config.gpu_memory_utilization) - peak


def _check_attention(attention: str, device: torch.device) -> None:
    if attention == "triton" and device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("triton attention on CPU needs TRITON_INTERPRET=1 from the "
                             "start of the process (pagedserve executor sets it)")
        log.warning("triton attention on CPU runs in triton's interpreter: slow")


def _tune_cpu_memory() -> None:
    bound_primitive_cache()
    if not tune_allocator():
        log.warning("could not tune the C allocator (not glibc?): steps may page-fault")


def _join_group(config: ExecutorConfig, model_config: ModelConfig,
                device: torch.device) -> TensorParallel | None:
    """This rank's tensor-parallel group, or None without tensor parallelism."""
    if config.tensor_parallel_size == 1:
        return None
    model_config.sharded(config.tensor_parallel_size)  # divisible, or say why
    return TensorParallel(config.tp_rank or 0, config.tensor_parallel_size, config.tp_master,
                          device)
