"""The wire protocol: versioned msgpack messages between clients, scheduler and executor.

Every message is a msgpack map ``{"v": PROTOCOL_VERSION, "type": <name>, ...fields}``.
Arrays of ints travel as packed little-endian int32 bytes (``Ints``), arrays of floats as
packed float32 bytes (``Floats``); both decode to numpy arrays. ``decode`` validates the
version, the type and every field, and raises ``ProtocolError`` naming what was wrong, so
a bad message is answered with an error instead of crashing a service.
"""
from __future__ import annotations

import array
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, NewType

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

Ints = NewType("Ints", np.ndarray)      # packed little-endian int32 on the wire
Floats = NewType("Floats", np.ndarray)  # packed little-endian float32 on the wire
_ARRAY_DTYPES = {Ints: np.dtype("<i4"), Floats: np.dtype("<f4")}


class ProtocolError(ValueError):
    """A message that cannot be decoded or fails validation; the text says which field."""


# ---------------------------------------------------------------- client <-> scheduler

@dataclass
class GenerateRequest:
    TYPE: ClassVar[str] = "generate"
    request_id: str                 # chosen by the client, unique among its live requests
    params: dict                    # SamplingParams.to_dict(); validated again by the scheduler
    stream: bool                    # true: a delta every step; false: one final output
    prompt: str | None = None       # text prompt, or ...
    prompt_token_ids: Ints | None = None  # ... token ids (exactly one of the two)
    # false: the prompt text already holds its special tokens (a rendered chat template),
    # so the tokenizer adds none (no second BOS)
    add_special_tokens: bool = True


@dataclass
class AbortRequest:
    TYPE: ClassVar[str] = "abort"
    request_id: str


@dataclass
class ModelInfoRequest:
    TYPE: ClassVar[str] = "model_info_request"
    request_id: str                 # chosen by the client; the answer carries it back


@dataclass
class ModelInfo:
    TYPE: ClassVar[str] = "model_info"
    request_id: str                 # the ModelInfoRequest's
    model: str                      # the model's name (its directory's)
    # Longest context served now, prompt and output tokens together: the model's (or
    # --max-model-len) until an executor is ready, which may lower it; final while
    # executor_ready
    max_model_len: int
    executor_ready: bool            # an executor is registered and ready: requests run now
    vocab_size: int                 # prompt token ids must be in [0, vocab_size)
    chat_template: str | None       # jinja source of the chat template; None: the model has none
    special_tokens: dict[str, str]  # bos_token, eos_token, ...: the variables a template reads
    adds_bos_token: bool            # the tokenizer puts a BOS before a text prompt itself


class Logprob(NamedTuple):
    """One token's entry in a position's logprobs, as vLLM's ``Logprob`` (a list on the wire)."""

    logprob: float                  # under the model's raw distribution
    rank: int                       # 1: the most likely token (ties count as above)
    decoded_token: str              # the token's own text, special tokens included


@dataclass
class CompletionDelta:
    TYPE: ClassVar[str] = "completion"
    index: int                      # which of the request's completions
    text: str                       # new text since the previous message
    token_ids: Ints                 # new token ids since the previous message
    cumulative_logprob: float       # sum of the sampled tokens' logprobs so far
    finish_reason: str | None = None      # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # per new token, when asked: {token_id: Logprob}, the sampled token first, then the top-N
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutputMsg:
    TYPE: ClassVar[str] = "output"
    request_id: str
    outputs: list[CompletionDelta]
    finished: bool
    prompt_token_ids: Ints | None = None  # in the first message of a request only
    # with them, where the request gave token ids: their text (special tokens kept), for echo
    prompt: str | None = None
    # with it, when asked: per prompt token {token_id: Logprob}, the prompt's token first,
    # then the top-N; None for the first token, which nothing predicts
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class OutputBatch:
    TYPE: ClassVar[str] = "outputs"
    # Several requests' outputs of one step for one client, in one message: a client
    # streaming 64 requests reads one message a step instead of 64. Each request's messages
    # keep their order.
    outputs: list[RequestOutputMsg]


@dataclass
class ErrorMsg:
    TYPE: ClassVar[str] = "error"
    code: str  # invalid_request | protocol_error | overloaded | request_lost | unavailable
    #            | internal
    message: str
    request_id: str | None = None   # set when the error belongs to one request


@dataclass
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    # both ways, at least once a second while a client has live requests: silence from the
    # scheduler means trouble for the client; silence from a client means it is gone. The
    # executor's heartbeat socket (routing id: its own + HEARTBEAT_SUFFIX) sends one every
    # EXECUTOR_HEARTBEAT_S, answered only while it is the registered executor.
    request_ids: list[str] | None = None  # from a client: its live requests, so that a
    #                                      restarted scheduler can say which it lost


HEARTBEAT_SUFFIX = b"/heartbeat"
CLIENT_HEARTBEAT_S = 1.0     # scheduler <-> client, each way, while a client has live requests
EXECUTOR_HEARTBEAT_S = 0.25  # executor -> scheduler, even mid-step
MAX_MESSAGE_MB = 16.0        # default cap on one message (the scheduler's --max-message-mb)
MAX_SEQ_ID = 2**31 - 1       # sequence ids travel as int32


# ---------------------------------------------------------------- executor <-> scheduler

@dataclass
class RegisterExecutor:
    TYPE: ClassVar[str] = "register"
    model: str                      # model directory the executor loaded
    architecture: str
    vocab_size: int
    max_model_len: int              # longest context the model serves exactly
    dtype: str                      # weights and KV cache dtype
    device: str
    kv_bytes_per_token: int         # all layers, K and V


@dataclass
class ConfigureExecutor:
    TYPE: ClassVar[str] = "configure"
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class ExecutorReady:
    TYPE: ClassVar[str] = "ready"
    num_device_blocks: int
    num_cpu_blocks: int
    # op -> the implementation chosen for it on this machine, and on a CPU "cpu": its name
    # and SIMD extensions (executor_svc.backends.chosen); shown by `pagedserve health`
    kernels: dict[str, str] = field(default_factory=dict)


@dataclass
class NewSeq:
    TYPE: ClassVar[str] = "new_seq"
    seq_id: int
    token_ids: Ints                 # every known token: the prompt, plus outputs when recomputed
    block_table: Ints               # blocks for the tokens computed this step
    params: dict                    # SamplerParams.to_dict(): what the sampler reads
    num_computed_tokens: int = 0    # leading tokens whose KV is already in the cache
    sample_index: int = 0           # which of its request's samples: seeds draws with the seed
    num_prompt_tokens: int | None = None  # leading tokens that are the prompt (the rest are
    #                                       outputs, of a recomputed sequence); None: all


@dataclass
class StepPlan:
    TYPE: ClassVar[str] = "step"
    step: int
    removed: Ints                   # finished or preempted seq ids: drop their state first
    new_seqs: list[NewSeq]          # sequences the executor has not seen (or must recompute)
    seq_ids: Ints                   # sequences computed this step, in batch order
    num_tokens: Ints                # tokens each computes this step (1 for a decode)
    block_appends: Ints             # flat (seq_id, block_id) pairs: blocks appended to tables
    # Block operations, applied in this order before the table updates and the forward pass
    # (so a block swapped out here may already be handed to another sequence in this plan):
    swap_out: Ints = field(default_factory=lambda: np.zeros(0, np.int32))  # (device, cpu) pairs
    swap_in: Ints = field(default_factory=lambda: np.zeros(0, np.int32))   # (cpu, device) pairs
    copies: Ints = field(default_factory=lambda: np.zeros(0, np.int32))    # (src, dst) device pairs
    # Table updates, applied in this order after the new sequences:
    # forks: flat (child_id, parent_id, sample_index) triples; the child starts as a copy
    # of the parent's state (tokens, block table, progress), sharing its blocks.
    forks: Ints = field(default_factory=lambda: np.zeros(0, np.int32))
    # Tokens the scheduler chose (beam search): flat (seq_id, token_id) pairs.
    append_tokens: Ints = field(default_factory=lambda: np.zeros(0, np.int32))
    # Copy-on-write changes a table's last entry (as it was before this plan's appends):
    # flat (seq_id, block_id) pairs.
    replace_last: Ints = field(default_factory=lambda: np.zeros(0, np.int32))


@dataclass
class TopLogprobs:
    TYPE: ClassVar[str] = "top_logprobs"
    seq_id: int
    token_ids: Ints                 # the N most likely tokens, most likely first
    logprobs: Floats
    sampled_rank: int = 0           # the sampled token's rank (1: most likely); 0: beam candidates


@dataclass
class PromptLogprobs:
    TYPE: ClassVar[str] = "prompt_logprobs"
    seq_id: int
    start: int                      # the position of the first prompt token scored (>= 1)
    logprobs: Floats                # each scored token's logprob given the tokens before it
    ranks: Ints                     # and its rank there (1: most likely)
    top_token_ids: Ints             # per scored token its N most likely, flat: N = len / count
    top_logprobs: Floats


@dataclass
class StepResult:
    TYPE: ClassVar[str] = "result"
    step: int
    seq_ids: Ints                   # sequences that sampled a token this step
    token_ids: Ints                 # the sampled tokens, same order
    logprobs: Floats                # the sampled tokens' logprobs, same order
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # for seqs that asked
    # Beam search: each beam that reached the end of its tokens gets its top 2 x beam_width
    # next tokens here instead of a sampled token; the scheduler chooses.
    beam_candidates: list[TopLogprobs] = field(default_factory=list)
    # The prompt tokens that this step's positions predict, for sequences that asked.
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    execute_ms: float = 0.0         # executor time for the step, for metrics
    block_ops_ms: float = 0.0       # of which swaps and copies: the swap cost the scheduler learns
    forward_ms: float = 0.0         # of which the forward pass, logits and sampling


MESSAGES = {cls.TYPE: cls for cls in (
    GenerateRequest, AbortRequest, ModelInfoRequest, RequestOutputMsg, OutputBatch, ModelInfo,
    ErrorMsg, Heartbeat, RegisterExecutor, ConfigureExecutor, ExecutorReady, StepPlan, StepResult)}


# ---------------------------------------------------------------- encode / decode

def encode(msg) -> bytes:
    """Serialise a message dataclass to msgpack bytes, tagged with version and type."""
    return msgpack.packb(_encoder(type(msg))(msg), use_bin_type=True)


def decode(data: bytes, expected: tuple[type, ...] | None = None):
    """Parse and validate one message; ``expected`` limits which types are acceptable."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"malformed msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"a message must be a map, got {type(raw).__name__}")
    version = raw.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}; "
                            f"this service speaks version {PROTOCOL_VERSION}")
    kind = raw.get("type")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None or (expected is not None and cls not in expected):
        allowed = sorted(c.TYPE for c in expected) if expected else sorted(MESSAGES)
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {allowed}")
    try:
        return _checker(cls)(raw)
    except _Invalid as exc:
        raise ProtocolError(exc.message(kind)) from None


# Both directions are compiled once per message class (and per type hint): a function that
# walks exactly its fields, instead of asking each message's fields and hints again. The
# scheduler encodes one output per request per step and every client decodes it, so this
# is per token (a decode took 33 µs when each call walked the hints).

_ENCODERS: dict[type, Callable[[Any], dict]] = {}


def _encoder(cls) -> Callable[[Any], dict]:
    """The function from a ``cls`` instance to its wire map."""
    encoder = _ENCODERS.get(cls)
    if encoder is not None:
        return encoder
    kind = getattr(cls, "TYPE", None)
    tag = {"v": PROTOCOL_VERSION, "type": kind} if MESSAGES.get(kind) is cls else {}
    hints = _hints(cls)
    plain, converted = [], []
    for f in dataclasses.fields(cls):
        to_wire = _to_wire(hints[f.name])
        if to_wire is _as_is:
            plain.append(f.name)
        else:
            converted.append((f.name, to_wire))

    # One dict display over the fields, compiled once (as dataclasses writes its __init__):
    # a loop over field names and getattr cost as much again as the values' conversion.
    entries = [f"{key!r}: {value!r}" for key, value in tag.items()]
    entries += [f"{name!r}: msg.{name}" for name in plain]
    entries += [f"{name!r}: to_wire_{i}(msg.{name})" for i, (name, _) in enumerate(converted)]
    namespace = {f"to_wire_{i}": to_wire for i, (_, to_wire) in enumerate(converted)}
    exec(f"def encode_fields(msg):\n    return {{{', '.join(entries)}}}", namespace)
    _ENCODERS[cls] = encode_fields = namespace["encode_fields"]
    return encode_fields


def _to_wire(hint) -> Callable[[Any], Any]:
    """The function from a value of type ``hint`` to what goes on the wire: packed arrays,
    nested messages as maps, lists of them item by item; anything else (plain values, and
    dicts, lists and named tuples of them) as it is, msgpack packs it."""
    inner = _optional_of(hint)
    if inner is not None and typing.get_origin(hint) in (typing.Union, types.UnionType):
        convert = _to_wire(inner)
        return _as_is if convert is _as_is else (
            lambda value: None if value is None else convert(value))
    if hint in _ARRAY_DTYPES:
        return _packer(_ARRAY_DTYPES[hint])
    if dataclasses.is_dataclass(hint):
        return _encoder(hint)
    if typing.get_origin(hint) is list:
        convert = _to_wire(typing.get_args(hint)[0])
        return _as_is if convert is _as_is else (
            lambda value: [convert(item) for item in value])
    return _as_is


def _as_is(value):
    return value


def _packer(dtype: np.dtype) -> Callable[[Any], bytes]:
    """Packs a list or array as ``dtype`` (little-endian int32 or float32). A list goes
    through ``array``, which takes a few values in a third of numpy's time (a streamed
    token's message holds one id)."""
    code = "i" if dtype.kind == "i" else "f"
    native = sys.byteorder == "little" and array.array(code).itemsize == dtype.itemsize

    def pack(value) -> bytes:
        if native and type(value) is list:
            try:
                return array.array(code, value).tobytes()
            except (TypeError, OverflowError):  # numpy's conversion (and its errors) decide
                pass
        return np.ascontiguousarray(value, dtype=dtype).tobytes()
    return pack


pack_ints = _packer(_ARRAY_DTYPES[Ints])  # an Ints field's bytes, as the encoders pack them


def _optional_of(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else None


class _Invalid(Exception):
    """A value that fails its check. Its path is built on the way out, one segment per
    enclosing field or item (``at``): nothing is formatted while a message is valid."""

    def __init__(self, render: Callable[[str], str]):
        super().__init__()
        self.render = render  # where -> the message
        self.path: list[str] = []

    def at(self, segment: str) -> _Invalid:
        self.path.append(segment)
        return self

    def message(self, root: str) -> str:
        return self.render(root + "".join(reversed(self.path)))


_CHECKERS: dict[Any, Callable[[Any], Any]] = {}


def _checker(hint) -> Callable[[Any], Any]:
    """The function that validates a wire value against ``hint`` (raising ``_Invalid``) and
    returns it converted: packed arrays to numpy, maps to dataclasses, lists to
    NamedTuples."""
    check = _CHECKERS.get(hint)
    if check is None:
        check = _CHECKERS[hint] = _build_checker(hint)
    return check


def _build_checker(hint) -> Callable[[Any], Any]:
    if hint in _ARRAY_DTYPES:
        return _array_checker(_ARRAY_DTYPES[hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union_checker(args)
    if origin is list:
        return _list_checker(_checker(args[0] if args else Any))
    if origin is dict and args:
        return _dict_checker(_checker(args[0]), _checker(args[1]))
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):
        return _named_tuple_checker(hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass_checker(hint)
    return _scalar_checker(hint)


def _array_checker(dtype: np.dtype):
    def check(value):
        if not isinstance(value, bytes) or len(value) % dtype.itemsize:
            raise _Invalid(lambda where: f"field {where!r} must be packed {dtype.itemsize}-byte "
                                         f"little-endian values, got {_describe(value)}")
        return np.frombuffer(value, dtype=dtype)
    return check


def _union_checker(args):
    nullable = type(None) in args
    options = [_checker(a) for a in args if a is not type(None)]
    if nullable and len(options) == 1:
        [only] = options
        return lambda value: None if value is None else only(value)

    def check(value):
        if value is None and nullable:
            return None
        first = None
        for option in options:
            try:
                return option(value)
            except _Invalid as exc:
                first = first or exc
        raise first
    return check


def _list_checker(item):
    def check(value):
        if not isinstance(value, list):
            raise _Invalid(lambda where: f"field {where!r} must be a list, "
                                         f"got {_describe(value)}")
        try:
            return [item(v) for v in value]
        except _Invalid:  # again, one by one, to say which
            for i, v in enumerate(value):
                try:
                    item(v)
                except _Invalid as exc:
                    raise exc.at(f"[{i}]") from None
            raise
    return check


def _dict_checker(key, item):
    def check(value):
        if not isinstance(value, dict):
            raise _Invalid(lambda where: f"field {where!r} must be a map, got {_describe(value)}")
        out = {}
        for k, v in value.items():
            try:
                checked = key(k)
            except _Invalid as exc:
                raise exc.at(" key") from None
            try:
                out[checked] = item(v)
            except _Invalid as exc:
                raise exc.at(f"[{k!r}]") from None
        return out
    return check


def _named_tuple_checker(cls):
    """A NamedTuple travels as a list of its fields, in order."""
    hints = _hints(cls)
    fields = [(name, _checker(hints[name])) for name in cls._fields]

    def check(value):
        if not isinstance(value, list) or len(value) != len(fields):
            raise _Invalid(lambda where: f"field {where!r} must be a list of {len(fields)} "
                                         f"({', '.join(cls._fields)}), got {_describe(value)}")
        items = []
        for (name, item), v in zip(fields, value):
            try:
                items.append(item(v))
            except _Invalid as exc:
                raise exc.at(f".{name}") from None
        return cls(*items)
    return check


def _dataclass_checker(cls):
    hints = _hints(cls)
    fields = [(f.name, _checker(hints[f.name]), f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING) for f in dataclasses.fields(cls)]

    def check(value):
        if not isinstance(value, dict):
            raise _Invalid(lambda where: f"field {where!r} must be a map, got {_describe(value)}")
        kwargs = {}
        for name, item, required in fields:
            if name in value:
                try:
                    kwargs[name] = item(value[name])
                except _Invalid as exc:
                    raise exc.at(f".{name}") from None
            elif required:
                raise _Invalid(lambda where: f"missing field {name!r} in {where!r}")
        return cls(**kwargs)
    return check


def _scalar_checker(hint):
    if hint is Any:
        return lambda value: value
    if hint is float:
        def check_float(value):
            if isinstance(value, float):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            raise _Invalid(lambda where: f"field {where!r} must be float, "
                                         f"got {_describe(value)}")
        return check_float
    base = typing.get_origin(hint) or hint

    def check(value):
        as_bool = base is int and isinstance(value, bool)  # a bool is an int to Python
        if isinstance(value, base) and not as_bool:
            return value
        got = "bool" if as_bool else _describe(value)
        raise _Invalid(lambda where: f"field {where!r} must be {base.__name__}, got {got}")
    return check


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]
