"""The scheduler's side of an executor, by hand: plans of one sequence and a socket that
answers heartbeats, for tests that drive an executor service or worker in this process."""
from __future__ import annotations

import time

import zmq

from pagedserve.common import protocol as p

BLOCK_SIZE = 4
PROMPT = [5, 17, 30, 9, 44, 2]


def plan(step: int, seq_id: int = 0, **fields) -> p.StepPlan:
    """A valid plan: sequence ``seq_id`` arrives with ``PROMPT`` (the first step), or decodes."""
    if step == 0:
        new = p.NewSeq(seq_id=seq_id, token_ids=PROMPT, block_table=[0, 1],
                       params={"temperature": 0.0})
        fields = dict(new_seqs=[new], seq_ids=[seq_id], num_tokens=[len(PROMPT)]) | fields
    else:
        fields = dict(new_seqs=[], seq_ids=[seq_id], num_tokens=[1]) | fields
    fields = dict(removed=[], block_appends=[]) | fields
    return p.decode(p.encode(p.StepPlan(step=step, **fields)))

class FakeScheduler:
    """The scheduler's side of the executor link, driven by hand: a ROUTER socket that
    answers heartbeats and hands every other message to the test."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.executor: bytes | None = None

    def receive(self, timeout_s: float = 30.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            identity, payload = self.sock.recv_multipart()
            if identity.endswith(p.HEARTBEAT_SUFFIX):
                self.sock.send_multipart([identity, p.encode(p.Heartbeat())])
                continue
            self.executor = identity
            return p.decode(payload)
        raise TimeoutError("the executor sent nothing")

    def send(self, msg) -> None:
        self.sock.send_multipart([self.executor, p.encode(msg)])

    def configure(self):
        """Answer the registration; the executor's next word (past repeats of it)."""
        self.send(p.ConfigureExecutor(block_size=BLOCK_SIZE, max_model_len=128, max_num_seqs=8,
                                      max_num_batched_tokens=64))
        while isinstance(msg := self.receive(), p.RegisterExecutor):
            pass
        return msg
