"""The executor service: load the model, register with the scheduler, apply step plans.

Handshake: ``register`` (model shape) -> ``configure`` (block size and budgets, from the
scheduler) -> size the KV pool -> ``ready`` (block counts). Then every ``step`` plan is
answered by one ``result``, or by an ``error`` when the plan is invalid.

A thread sends a heartbeat every 0.25 s on a socket of its own, mid-step too, so that the
scheduler notices a dead executor within its ``--executor-timeout``. Heard back from nobody
for ``SCHEDULER_TIMEOUT_S`` (the scheduler died or restarted, or took this executor for dead),
the executor drops its state and registers again.

With ``--tensor-parallel-size N`` this process is one rank (``executor_svc.parallel``): rank 0
does all of the above and tells the other ranks each configuration and plan; they follow.
"""
from __future__ import annotations

import os
import threading
import time
import uuid

import torch
import zmq

from pagedserve.common import protocol as p
from pagedserve.common.auth import peer_keys
from pagedserve.common.config import ExecutorConfig
from pagedserve.common.log import get_logger
from pagedserve.executor_svc.cache_engine import CacheEngine
from pagedserve.executor_svc.cpu import bound_primitive_cache, release_free_memory, tune_allocator
from pagedserve.executor_svc.model import ModelConfig, load_model
from pagedserve.executor_svc.model_runner import ModelRunner, PlanError
from pagedserve.executor_svc.parallel import Command, TensorParallel

log = get_logger("executor")
REGISTER_RETRY_MS = 2000
SCHEDULER_TIMEOUT_S = 3.0
IDLE_TRIM_S = 1.0
GIB = 1 << 30


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (exact, and the reference for tests); on CUDA the
    checkpoint's half-precision dtype, with float32 checkpoints served in bfloat16."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    return model_config.torch_dtype if model_config.torch_dtype != torch.float32 else torch.bfloat16


def resolve_kv_dtype(name: str, dtype: torch.dtype, attention: str) -> torch.dtype:
    """The KV cache's dtype: ``auto``, the weights' ``dtype``. Another needs the torch
    attention backend (the CPU kernels read a bfloat16 cache under float32 queries; the
    triton kernels read the cache in the queries' dtype)."""
    kv_dtype = dtype if name == "auto" else getattr(torch, name)
    if kv_dtype != dtype and attention != "torch":
        raise ValueError(f"--kv-cache-dtype {name} under {str(dtype).removeprefix('torch.')} "
                         f"weights needs --attention-backend torch, not {attention}")
    return kv_dtype


class ExecutorService:
    def __init__(self, config: ExecutorConfig):
        self.config = config
        self.device = torch.device(config.device)
        model_dir = str(config.model_dir())
        self.model_config = ModelConfig.from_model_dir(model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        if self.device.type == "cpu":
            bound_primitive_cache()
            if not tune_allocator():
                log.warning("could not tune the C allocator (not glibc?): steps may "
                            "page-fault")
        self.attention = config.resolved_attention_backend()
        if self.attention == "triton" and self.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("triton attention on CPU needs TRITON_INTERPRET=1 from the "
                                 "start of the process (pagedserve executor sets it)")
            log.warning("triton attention on CPU runs in triton's interpreter: slow")
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype, self.attention)
        self.tp = None
        if config.tensor_parallel_size > 1:
            self.model_config.sharded(config.tensor_parallel_size)  # divisible, or say why
            self.tp = TensorParallel(config.tp_rank or 0, config.tensor_parallel_size,
                                     config.tp_master, self.device)
        log.info("loading model", model=model_dir, dtype=str(self.dtype), device=str(self.device),
                 attention=self.attention, tp_rank=config.tp_rank,
                 tensor_parallel_size=config.tensor_parallel_size)
        self.model = load_model(model_dir, self.dtype, self.device, tp=self.tp)
        self.model_config = self.model.config  # this rank's share of the heads
        if self.device.type == "cpu":
            release_free_memory()
        self.model_dir = model_dir
        self.runner: ModelRunner | None = None
        self._stopped = False
        if self.tp is not None and not self.tp.is_driver:
            return  # only rank 0 talks to the scheduler
        self.identity = f"executor-{uuid.uuid4().hex[:12]}".encode()
        self.keys = peer_keys("executor", config.keys) if config.auth else None
        self.ctx = zmq.Context()
        self.sock = self._connect(self.identity)
        self._registered = threading.Event()  # set while the scheduler knows us
        self._lost = threading.Event()  # set by the heartbeat thread: the scheduler is gone
        self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                           name="executor-heartbeat")

    def stop(self) -> None:
        self._stopped = True

    def serve_forever(self) -> None:
        if self.tp is not None and not self.tp.is_driver:
            self._follow()
            return
        self._heartbeat.start()
        healthy = False  # the group, if any, can still hear a stop
        try:
            while not self._stopped:
                configure = self._register()
                if configure is None:
                    break
                self._start_cache(configure)
                self._lost.clear()
                self._registered.set()
                self._loop()
                self._registered.clear()
                if self._lost.is_set():
                    log.warning("lost the scheduler: dropping every sequence, registering "
                                "again")
                    self._drop_cache()
            healthy = True
        finally:
            self._stopped = True
            if healthy:
                self._tell(Command.STOP)
                if self.tp is not None:
                    self.tp.close()
            self._heartbeat.join()
            self.ctx.destroy(linger=0)
            log.info("executor stopped")

    def _follow(self) -> None:
        """A rank other than 0: do what rank 0 says, in lockstep with it, until it stops."""
        while True:
            command, payload = self.tp.receive()
            if command is Command.CONFIGURE:
                self._start_cache(p.decode(payload, (p.ConfigureExecutor,)))
            elif command is Command.PLAN:
                try:
                    self.runner.execute(p.decode(payload, (p.StepPlan,)))
                except (p.ProtocolError, PlanError, ValueError):
                    pass  # rank 0 rejects it the same way, and answers the scheduler
            elif command is Command.DROP:
                self._drop_cache()
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

    def _connect(self, identity: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        if self.keys is not None:
            self.keys.secure(sock)
        sock.connect(self.config.scheduler)
        return sock

    def _beat(self) -> None:
        """Heartbeats to the scheduler; silence back while registered sets ``_lost``."""
        sock = self._connect(self.identity + p.HEARTBEAT_SUFFIX)
        beat = p.encode(p.Heartbeat())
        heard = time.monotonic()
        try:
            while not self._stopped:
                sock.send(beat)
                deadline = time.monotonic() + p.EXECUTOR_HEARTBEAT_S
                while (left := deadline - time.monotonic()) > 0:
                    if sock.poll(int(left * 1000) + 1):
                        sock.recv()
                        heard = time.monotonic()
                if not self._registered.is_set():
                    heard = time.monotonic()  # only silence after registering counts
                elif time.monotonic() - heard > SCHEDULER_TIMEOUT_S:
                    self._lost.set()
        finally:
            sock.close(linger=0)

    def _drop_cache(self) -> None:
        self._tell(Command.DROP)
        self.runner = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _register(self) -> p.ConfigureExecutor | None:
        """Announce the model until the scheduler answers with its configuration."""
        register = p.encode(p.RegisterExecutor(
            model=self.model_dir, architecture=self.model_config.architecture,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.model_config.max_model_len,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
            kv_bytes_per_token=CacheEngine.bytes_per_block(self.model_config, 1,
                                                           self.kv_dtype)))
        log.info("registering with scheduler", scheduler=self.config.scheduler)
        while not self._stopped:
            self.sock.send(register)
            deadline = time.monotonic() + REGISTER_RETRY_MS / 1000
            while not self._stopped and (left := deadline - time.monotonic()) > 0:
                if not self.sock.poll(int(left * 1000) + 1):
                    continue
                try:
                    msg = p.decode(self.sock.recv())
                except p.ProtocolError as exc:
                    log.error("bad message from scheduler", error=str(exc))
                    continue
                if isinstance(msg, p.ConfigureExecutor):
                    return msg
                if isinstance(msg, p.ErrorMsg) and msg.code == "unavailable":
                    log.warning("scheduler busy, registering again", reason=msg.message)
                    time.sleep(REGISTER_RETRY_MS / 1000)
                    break
                if isinstance(msg, p.ErrorMsg):
                    raise RuntimeError(f"scheduler refused registration: {msg.message}")
                # a plan meant for before a restart: nothing to answer
        return None

    def _start_cache(self, configure: p.ConfigureExecutor) -> None:
        self._tell(Command.CONFIGURE, p.encode(configure))
        num_device = self._num_device_blocks(configure)
        num_cpu = self.config.num_cpu_blocks
        if num_cpu is None:
            num_cpu = CacheEngine.num_blocks_for_bytes(
                self.model_config, configure.block_size, self.kv_dtype,
                int(self.config.swap_space_gb * GIB))
        if self.tp is not None:  # the same block ids on every rank: the smallest pool
            num_device, num_cpu = self.tp.min(num_device), self.tp.min(num_cpu)
        cache = CacheEngine(self.model_config, configure.block_size, num_device, num_cpu,
                            self.kv_dtype, self.device)
        self.runner = ModelRunner(self.model, cache, configure.block_size, self.attention)
        # Not yet under tensor parallelism: capturing its all-reduces is untested.
        if (self.device.type == "cuda" and self.attention == "triton"
                and not self.config.enforce_eager and self.tp is None):
            start = time.perf_counter()
            self.runner.use_decode_graphs(configure.max_num_seqs, configure.max_model_len)
            log.info("decode graphs captured", batch_sizes=len(self.runner.graphs.buckets),
                     max_batch=self.runner.graphs.max_batch,
                     seconds=round(time.perf_counter() - start, 1))
        if self.tp is None or self.tp.is_driver:
            self.sock.send(p.encode(p.ExecutorReady(num_device_blocks=num_device,
                                                    num_cpu_blocks=num_cpu)))
        log.info("KV cache ready", device_blocks=num_device, cpu_blocks=num_cpu,
                 block_size=configure.block_size, dtype=str(self.kv_dtype).removeprefix("torch."))

    def _num_device_blocks(self, configure: p.ConfigureExecutor) -> int:
        if self.config.num_device_blocks is not None:
            return self.config.num_device_blocks
        if self.device.type == "cuda" and self.config.kv_cache_gb is None:
            free_bytes = self._profile_cuda(configure)
        else:
            free_bytes = int((self.config.kv_cache_gb or 4.0) * GIB)
        # Less one: the cache adds its null block.
        num = CacheEngine.num_blocks_for_bytes(self.model_config, configure.block_size,
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
        scratch = CacheEngine(self.model_config, configure.block_size, blocks, 0, self.kv_dtype,
                              self.device)
        runner = ModelRunner(self.model, scratch, configure.block_size, self.attention)
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

    def _loop(self) -> None:
        last_step, trimmed = time.monotonic(), True
        while not self._stopped and not self._lost.is_set():
            if not self.sock.poll(200):
                if not trimmed and time.monotonic() - last_step > IDLE_TRIM_S:
                    # Idle: give back what the allocator kept for the steps (cpu.py keeps up
                    # to 1 GiB of freed memory in the heap while busy).
                    release_free_memory()
                    self._tell(Command.TRIM)
                    trimmed = True
                continue
            last_step, trimmed = time.monotonic(), False
            payload = self.sock.recv()
            try:
                plan = p.decode(payload, (p.StepPlan,))
                self._tell(Command.PLAN, payload)
                reply = self.runner.execute(plan)
            except (p.ProtocolError, PlanError, ValueError) as exc:
                log.error("rejected plan", error=str(exc))
                reply = p.ErrorMsg(code="invalid_request", message=str(exc))
            self.sock.send(p.encode(reply))

