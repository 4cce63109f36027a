"""Apply a step plan: update the mirror of each sequence's state (``mirror``), run the block
operations and the model, sample.

The executor never decides which block holds what; it holds what the plans told it. A plan is
checked whole before anything changes (an invalid one is a ``PlanError``); once it is applied, a
failure is an ``ExecutorFault``.

A step is launched (its work enqueued on the device, its sampled tokens left there) and then
finished (its result read back). Between the two, the next plan may be launched ahead of it
(``can_launch_ahead``): a token the step in flight sampled is a ``PLACEHOLDER`` in its
sequence's tokens until the step finishes, and the next step takes it as its input from the
device. On a GPU the host then plans and launches step N + 1 while step N runs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pagedserve.common import protocol as p
from pagedserve.executor_svc import backends
from pagedserve.executor_svc.autotune import Tuner
from pagedserve.executor_svc.backends.cpu import FusedDecoder
from pagedserve.executor_svc.cache_engine import BlockOps, CacheEngine
from pagedserve.executor_svc.cuda_graphs import DecodeGraphs, DecodeOutput
from pagedserve.executor_svc.mirror import PlanError, SeqState, TableUpdate, plan_pairs
from pagedserve.executor_svc.model import PagedLlamaForCausalLM
from pagedserve.executor_svc.sampler import Sampler, SamplerOutput, score
from pagedserve.executor_svc.transfer import to_device

_SCORE_ROWS = 256  # prompt positions scored at once: their logits are [rows, vocab]
PLACEHOLDER = -1  # a token sampled by a step in flight, not yet read back from the device


class ExecutorFault(RuntimeError):
    """A step failed after its plan was applied: the executor's mirror and KV cache can no
    longer be trusted (the cause is chained)."""


@dataclass
class Launched:
    """A step whose work is enqueued: ``ModelRunner.finish`` reads its result back."""

    result: p.StepResult  # all but what sampling gives: prompt logprobs, block_ops_ms
    start: float  # perf_counter when the plan arrived
    forward_start: float
    forward_end: float = 0.0  # on the host: the work was enqueued (or done, on a CPU)
    out: SamplerOutput | None = None
    sampled: list[tuple[int, int, SeqState]] = field(default_factory=list)  # (row, id, state)
    beams: list[tuple[int, int, SeqState]] = field(default_factory=list)
    # The sampled rows' tokens on the device, row i of ``token_ids`` the token of the
    # sequence with ``rows[seq id] == i``; on the host (once ``done``) ``host``'s.
    token_ids: Tensor | None = None
    rows: dict[int, int] = field(default_factory=dict)
    at: list[int] = field(default_factory=list)  # where each sampled row's placeholder is
    host: tuple[Tensor, Tensor] | None = None  # token ids, float32 logprobs
    # CUDA: recorded before the step's work and after it (the copies to ``host`` included)
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def done(self) -> bool:
        """Whether the device has finished the step: ``finish`` would not wait."""
        return self.events is None or self.events[1].query()


class ModelRunner:
    """Runs plans on ``model`` over ``cache`` with the attention backend that serves
    ``attention_backend`` for them (``backends.attention_backend``; timed by ``tuner``
    where there is a choice), chosen here once."""

    def __init__(self, model: PagedLlamaForCausalLM, cache: CacheEngine, block_size: int,
                 attention_backend: str = "torch", tuner: Tuner | None = None):
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = cache.device
        self.attention = backends.attention_backend(attention_backend, block_size, self.device,
                                                    model.dtype, cache.dtype, cache.null_block,
                                                    tuner, model.config)
        self.sampler = Sampler(backends.sampler_ops(model))
        self.seqs: dict[int, SeqState] = {}
        self.graphs: DecodeGraphs | None = None
        self._in_flight: Launched | None = None  # the last step launched, until it finishes
        model.stack = FusedDecoder.build(model, self.attention, cache.kv_caches)

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int,
                          capture: bool = True) -> None:
        """Run pure-decode steps of up to ``max_num_seqs`` sequences (contexts up to
        ``max_model_len``) from CUDA graphs, captured now (``executor_svc.cuda_graphs``)."""
        self.graphs = DecodeGraphs(self.model, self.cache.kv_caches, self.attention,
                                   self.sampler.greedy, self.block_size, self.cache.null_block,
                                   max_num_seqs, max_model_len, capture)

    def execute(self, plan: p.StepPlan) -> p.StepResult:
        """Apply ``plan``, run its step and read its result back (``launch``, ``finish``)."""
        return self.finish(self.launch(plan))

    def can_launch_ahead(self, plan: p.StepPlan) -> bool:
        """Whether ``plan`` may be launched before the step in flight finishes: none of its
        sequences needs its tokens on the host before then (penalties count them)."""
        return not any(seq.params.penalised for seq_id in plan.seq_ids.tolist()
                       if (seq := self.seqs.get(seq_id)) is not None)

    def launch(self, plan: p.StepPlan) -> Launched:
        """Apply ``plan`` and enqueue its step. A ``PlanError`` rejects the plan before
        anything changed; any failure after that is an ``ExecutorFault``. At most one
        launched step may be unfinished when it is called, the one it goes ahead of."""
        start = time.perf_counter()
        # Build the updated sequence states aside and check the whole plan before any
        # state or KV changes, so a rejected plan leaves the executor as it was.
        seqs = TableUpdate(self.seqs, self.cache.num_device_blocks).apply(plan)
        seq_ids, batch = self._batch(plan, seqs)
        block_ops = self._block_ops(plan)
        try:
            launched = self._apply_and_run(plan, seqs, seq_ids, batch, block_ops, start)
        except Exception as exc:  # whatever failed, the plan was applied: the state is unknown
            raise ExecutorFault(f"step {plan.step} failed after its plan was applied: "
                                f"{type(exc).__name__}: {exc}") from exc
        self._in_flight = launched if launched.token_ids is not None else None
        return launched

    def finish(self, launched: Launched) -> p.StepResult:
        """``launched``'s result, once the device is done with it: its sampled tokens take
        their sequences' placeholders."""
        try:
            return self._finish(launched)
        except Exception as exc:
            raise ExecutorFault(f"step {launched.result.step} failed reading its result back: "
                                f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self._in_flight is launched:
                self._in_flight = None

    def _apply_and_run(self, plan: p.StepPlan, seqs: dict[int, SeqState], seq_ids: list[int],
                       batch: list[tuple[SeqState, int]], block_ops: BlockOps | None,
                       start: float) -> Launched:
        ops_start = time.perf_counter()
        if block_ops is not None:
            self.cache.apply(block_ops)
        block_ops_ms = (time.perf_counter() - ops_start) * 1e3
        self.seqs = seqs
        result = p.StepResult(step=plan.step, seq_ids=np.zeros(0, np.int32),
                              token_ids=np.zeros(0, np.int32), logprobs=np.zeros(0, np.float32),
                              block_ops_ms=block_ops_ms)
        launched = Launched(result, start, time.perf_counter())
        if self.device.type == "cuda":
            launched.events = (torch.cuda.Event(enable_timing=True),
                               torch.cuda.Event(enable_timing=True))
            launched.events[0].record()
        self._run(launched, seq_ids, batch)
        if launched.events is not None:
            launched.events[1].record()
        launched.forward_end = time.perf_counter()
        return launched

    def _batch(self, plan: p.StepPlan,
               seqs: dict[int, SeqState]) -> tuple[list[int], list[tuple[SeqState, int]]]:
        """The step's sequence ids, and each one's state with its number of new tokens.
        Every scheduled sequence is known, once, and its tokens have slots in its table."""
        seq_ids, num_tokens = plan.seq_ids.tolist(), plan.num_tokens.tolist()
        if len(seq_ids) != len(num_tokens):
            raise PlanError(f"{len(seq_ids)} seq_ids but {len(num_tokens)} num_tokens")
        if len(set(seq_ids)) != len(seq_ids) or (num_tokens and min(num_tokens) < 1):
            raise PlanError("each scheduled seq appears once with num_tokens >= 1")
        batch = []
        for seq_id, n in zip(seq_ids, num_tokens):
            seq = seqs.get(seq_id)
            if seq is None:
                raise PlanError(f"unknown seq id {seq_id}")
            end = seq.num_computed_tokens + n
            if end > len(seq.token_ids) or end > len(seq.block_table) * self.block_size:
                raise PlanError(f"seq {seq_id}: {n} tokens from {seq.num_computed_tokens} "
                                f"exceed its {len(seq.token_ids)} tokens or "
                                f"{len(seq.block_table)} blocks")
            batch.append((seq, n))
        return seq_ids, batch

    def _block_ops(self, plan: p.StepPlan) -> BlockOps | None:
        """The plan's block operations (its fields of ``BlockOps``' names), checked; None
        when it has none (most steps)."""
        if not any(len(getattr(plan, name)) for name in BlockOps._fields):
            return None
        try:
            return self.cache.check(*(plan_pairs(plan, name) for name in BlockOps._fields))
        except ValueError as exc:
            raise PlanError(str(exc)) from None

    @torch.inference_mode()
    def _run(self, launched: Launched, seq_ids: list[int],
             batch: list[tuple[SeqState, int]]) -> None:
        if not batch:
            return
        hidden, last_token_indices, decoded = self._forward(seq_ids, batch)
        tp = self.model.tp
        if tp is None or tp.is_driver:
            launched.result.prompt_logprobs = self._prompt_logprobs(hidden, seq_ids, batch)
        rows = []  # a sequence samples once all its known tokens are in the cache
        for i, (seq, n) in enumerate(batch):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq.token_ids):
                rows.append(i)
        if not rows:
            return
        if tp is not None and not tp.is_driver:
            # Rank 0 samples; this rank appends the same tokens, and answers no one.
            for seq_id, token in zip(*(t.tolist() for t in tp.share_tokens())):
                self.seqs[seq_id].token_ids.append(token)
            return
        seqs = [batch[i][0] for i in rows]
        generators = [self._generator(seq) for seq in seqs]
        if decoded is not None:  # a graph's step: its logits and greedy tokens are there
            logits, greedy = decoded.logits, (decoded.token_ids, decoded.logprobs)
            if len(rows) < len(hidden):
                index = to_device(torch.tensor(rows), self.device)
                logits, greedy = logits[index], tuple(t[index] for t in greedy)
            out = self.sampler(logits, seqs, generators, greedy=greedy)
        else:
            # Every sequence computing one token and sampling it (a decode step): all of
            # hidden.
            last = hidden if len(rows) == len(hidden) else hidden[last_token_indices()[rows]]
            out = self.sampler(self.model.compute_logits(last), seqs, generators)
        launched.out = out
        for j, (i, seq) in enumerate(zip(rows, seqs)):
            (launched.beams if seq.params.beam_width > 1 else launched.sampled).append(
                (j, seq_ids[i], seq))
        if launched.sampled:
            self._leave_on_device(launched)

    def _leave_on_device(self, launched: Launched) -> None:
        """Give each sampled sequence its token's placeholder, keep the tokens on the device
        for a step launched ahead, and start copying them and their logprobs to the host
        (``Launched.done`` once copied)."""
        out, sampled = launched.out, launched.sampled
        token_ids, logprobs = out.token_ids, out.logprobs
        if len(sampled) != len(token_ids):  # beams among the rows: theirs stay out
            rows = to_device(torch.tensor([j for j, _, _ in sampled]), token_ids.device)
            token_ids, logprobs = token_ids[rows], logprobs[rows]
        for i, (_, seq_id, seq) in enumerate(sampled):
            launched.rows[seq_id] = i
            launched.at.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
        launched.token_ids = token_ids
        if token_ids.device.type == "cpu":
            launched.host = (token_ids, logprobs.float())
            return
        launched.host = tuple(
            torch.empty(len(t), dtype=dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t, dtype in ((token_ids, token_ids.dtype), (logprobs, torch.float32)))

    def _finish(self, launched: Launched) -> p.StepResult:
        finish_start, result = time.perf_counter(), launched.result
        if launched.events is not None:
            launched.events[1].synchronize()
        if launched.sampled:
            self._sampled(result, launched)
        tp, out = self.model.tp, launched.out
        if tp is not None and tp.is_driver and out is not None:
            tp.share_tokens(torch.from_numpy(result.seq_ids), torch.from_numpy(result.token_ids))
        # Beams keep their tokens: the scheduler chooses among the candidates (the top
        # 2 x beam_width, or the logprobs asked for if more) and sends the chosen token
        # back (append_tokens), possibly to a fork.
        result.beam_candidates = [
            _top(out, j, sid, max(2 * seq.params.beam_width, seq.params.logprobs or 0))
            for j, sid, seq in launched.beams]
        if launched.events is not None:  # the device's time, not the launches'
            result.forward_ms = launched.events[0].elapsed_time(launched.events[1])
        else:  # the host's: the step's work, and reading its result back
            result.forward_ms = (launched.forward_end - launched.forward_start
                                 + time.perf_counter() - finish_start) * 1e3
        result.execute_ms = (launched.forward_start - launched.start) * 1e3 + result.forward_ms
        return result

    def _prompt_logprobs(self, hidden: Tensor, seq_ids: list[int],
                         batch: list[tuple[SeqState, int]]) -> list[p.PromptLogprobs]:
        """Score the prompt tokens that this step's positions predict (position i predicts
        token i + 1), for the sequences that ask; before their progress moves on."""
        scored, offset = [], 0
        for seq_id, (seq, n) in zip(seq_ids, batch):
            first = seq.num_computed_tokens
            count = min(first + n, seq.num_prompt_tokens - 1) - first
            if seq.params.prompt_logprobs is not None and count > 0:
                scored.append(self._score_prompt(seq_id, seq, first,
                                                 hidden[offset:offset + count]))
            offset += n
        return scored

    def _score_prompt(self, seq_id: int, seq: SeqState, first: int,
                      hidden: Tensor) -> p.PromptLogprobs:
        """Score the prompt tokens after position ``first`` that ``hidden`` predicts, a few
        hundred positions at a time (their logits span the vocabulary)."""
        targets = torch.tensor(seq.token_ids[first + 1:first + 1 + len(hidden)],
                               device=self.device)
        parts = [score(self.model.compute_logits(rows), tokens, seq.params.prompt_logprobs)
                 for rows, tokens in zip(hidden.split(_SCORE_ROWS), targets.split(_SCORE_ROWS))]
        logprobs, ranks, top_ids, top_logprobs = (torch.cat(t).cpu().numpy() for t in zip(*parts))
        return p.PromptLogprobs(seq_id=seq_id, start=first + 1, logprobs=logprobs, ranks=ranks,
                                top_token_ids=top_ids.ravel(), top_logprobs=top_logprobs.ravel())

    def _forward(self, seq_ids: list[int], batch: list[tuple[SeqState, int]]
                 ) -> tuple[Tensor, Callable[[], Tensor], DecodeOutput | None]:
        """The hidden states of the step's new tokens, what says where each sequence's last
        one is (asked only where a step has more tokens than sequences: an operator less in
        a decode step), and a graph's outputs: from a graph when every sequence computes one
        token and one fits."""
        tables = [seq.block_table for seq, _ in batch]
        computed = [seq.num_computed_tokens for seq, _ in batch]
        if (self.graphs is not None and all(n == 1 for _, n in batch)
                and self.graphs.serves(len(batch), max(map(len, tables)))):
            token_ids = [seq.token_ids[seq.num_computed_tokens] for seq, _ in batch]
            decoded = self.graphs.run(token_ids, computed, tables,
                                      lambda ids: self._take_in_flight(ids, token_ids, seq_ids))
            graphs = self.graphs  # token i is sequence i's
            return decoded.hidden, lambda: graphs.query_start_loc[:len(batch)], decoded
        token_ids, owners = [], []
        for seq_id, (seq, n) in zip(seq_ids, batch):
            token_ids.extend(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n])
            owners.extend([seq_id] * n)
        meta = self.attention.build(tables, computed, [n for _, n in batch])
        input_ids = to_device(torch.tensor(token_ids), self.device)
        self._take_in_flight(input_ids, token_ids, owners)
        hidden = self.model(input_ids, meta.positions, meta, self.cache.kv_caches)
        return hidden, lambda: meta.last_token_indices, None

    def _take_in_flight(self, input_ids: Tensor, token_ids: list[int],
                        owners: list[int]) -> None:
        """Where ``token_ids`` (``input_ids``' values, token i of sequence ``owners[i]``)
        holds a placeholder, write the token the step in flight sampled there, device to
        device."""
        launched = self._in_flight
        if launched is None:  # then no placeholders: a step finished fills its own
            return
        at = [i for i, token in enumerate(token_ids) if token == PLACEHOLDER]
        if not at:
            return
        if any(owners[i] not in launched.rows for i in at):
            raise RuntimeError("a step computes a token that no step in flight samples")
        rows = [launched.rows[owners[i]] for i in at]
        if at == rows and at[-1] == len(at) - 1:  # the first rows, in order: no index
            input_ids[:len(at)].copy_(launched.token_ids[:len(at)])
            return
        index = to_device(torch.tensor([at, rows]), input_ids.device)
        input_ids[index[0]] = launched.token_ids[index[1]].to(input_ids.dtype)

    def _sampled(self, result: p.StepResult, launched: Launched) -> None:
        """The sampled tokens in their sequences' placeholders and in the result."""
        token_ids, logprobs = launched.host
        tokens = token_ids.tolist()
        for (_, seq_id, seq), at, token in zip(launched.sampled, launched.at, tokens):
            seq.token_ids[at] = token
            # A plan launched ahead of this step may have copied the state (TableUpdate):
            # the live copy holds the placeholder too.
            live = self.seqs.get(seq_id)
            if (live is not None and live is not seq and len(live.token_ids) > at
                    and live.token_ids[at] == PLACEHOLDER):
                live.token_ids[at] = token
        result.seq_ids = np.array([sid for _, sid, _ in launched.sampled], dtype=np.int32)
        result.token_ids = np.array(tokens, dtype=np.int32)
        result.logprobs = logprobs.numpy()
        out = launched.out
        ranks = out.ranks.tolist() if out.ranks is not None else []
        result.top_logprobs = [_top(out, j, sid, seq.params.logprobs, ranks[j])
                               for j, sid, seq in launched.sampled
                               if seq.params.logprobs is not None]

    def _generator(self, seq: SeqState) -> torch.Generator | None:
        """Seeded requests draw from (seed, sample index, position) alone: batch-independent
        and exact across preemption, since a recomputed sequence reaches the same positions;
        the n samples of one request draw differently."""
        if seq.params.seed is None or seq.params.greedy or seq.params.beam_width > 1:
            return None
        gen = torch.Generator(device=self.device)
        key = (seq.params.seed * 0x9E3779B97F4A7C15 + seq.sample_index * 0xBF58476D1CE4E5B9
               + len(seq.token_ids))
        gen.manual_seed(key % 2**63)
        return gen


def _top(out, row: int, seq_id: int, k: int, sampled_rank: int = 0) -> p.TopLogprobs:
    return p.TopLogprobs(seq_id=seq_id, token_ids=out.top_token_ids[row, :k].cpu().numpy(),
                         logprobs=out.top_logprobs[row, :k].float().cpu().numpy(),
                         sampled_rank=sampled_rank)
