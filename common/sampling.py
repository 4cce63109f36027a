"""Sampling parameters of one request, shaped like vLLM's ``SamplingParams``.

Validated at construction on the client and again on the scheduler (``from_dict``),
so a bad value is a ``ValueError`` that names the field wherever it enters. The executor
receives only ``SamplerParams``, what it samples with, already validated.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields

# The fields a model's generation_config.json may give a default for (vLLM's default
# ``--generation-config auto``), with vLLM's own defaults. A request that leaves one unset
# (None) gets the model's default on the scheduler, else this one.
# A temperature below this samples greedily, as vLLM's: logits divided by less overflow
# float32 (5e-324 is 0 there), and their softmax would be NaN.
GREEDY_BELOW = 1e-5
MODEL_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                  "repetition_penalty": 1.0, "max_tokens": 16}


@dataclass
class SamplingParams:
    """How to sample the completions of one request.

    n: completions to return. best_of: completions to generate, the best ``n`` returned.
    temperature: 0 (below ``GREEDY_BELOW``) means greedy. top_p: nucleus mass in (0, 1].
    top_k: 0 (or -1) disables.
    min_p: drop the tokens less likely than ``min_p`` times the most likely one, in [0, 1].
    seed: per-request seed; a seeded request samples the same tokens whatever else is batched.
    max_tokens: new tokens at most. min_tokens: new tokens before EOS, ``stop_token_ids`` or a
    stop string may end the output (EOS and the stop tokens cannot be sampled until then).
    stop: strings that end the output (not included in it unless
    ``include_stop_str_in_output``). stop_token_ids: token ids that end the output.
    ignore_eos: keep going past EOS.
    presence_penalty, frequency_penalty: in [-2, 2], subtracted from the logit of each token
    already in the output, once (presence) or once per occurrence (frequency), as OpenAI's.
    repetition_penalty > 0: a token already in the prompt or the output has its logit divided
    by it (multiplied when negative), as transformers' and vLLM's; 1 disables.
    logit_bias: token id -> bias in [-100, 100], added to that token's logit.
    logprobs: also return, per position, the top-N tokens and the sampled one, each with its
    logprob, rank and text (0: the sampled token only). prompt_logprobs: the same for each
    prompt token after the first, given the tokens before it (the prompt is then computed
    whole: no prefix-cache hits). skip_special_tokens: leave special tokens out of the text.
    beam_width > 1: beam search with ``length_penalty`` and ``early_stopping`` (transformers'
    semantics); it is deterministic, so temperature, top_p, top_k, min_p and seed do not
    apply, nor do the penalties, logit_bias and min_tokens; it returns the ``n`` best of its
    finished hypotheses.

    The fields of ``MODEL_DEFAULTS`` may be left unset (None): the scheduler gives them the
    model's default (its generation_config.json), else vLLM's; read here, they hold vLLM's.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._unset = frozenset(name for name in MODEL_DEFAULTS if getattr(self, name) is None)
        for name in self._unset:
            setattr(self, name, MODEL_DEFAULTS[name])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def _validate(self) -> None:
        _check_int("n", self.n, low=1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, low=self.n)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_inclusive=False, high=1.0)
        _check_int("top_k", self.top_k, low=0, high=_MAX_TOKEN_ID)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got "
                             f"{self.min_tokens}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        for i, t in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", t, low=0, high=_MAX_TOKEN_ID)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0,
                      low_inclusive=False)
        self._validate_logit_bias()
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=0, high=MAX_LOGPROBS)
        _check_int("beam_width", self.beam_width, low=1)
        _check_number("length_penalty", self.length_penalty)
        _check_bool("early_stopping", self.early_stopping)
        if self.beam_width > 1:
            self._validate_beam_search()

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a map of token id to bias, got "
                             f"{self.logit_bias!r}")
        for token_id, bias in self.logit_bias.items():
            _check_int("logit_bias token id", token_id, low=0, high=_MAX_TOKEN_ID)
            _check_number(f"logit_bias[{token_id}]", bias, low=-100.0, high=100.0)

    def _validate_beam_search(self) -> None:
        if self.n > self.beam_width:
            raise ValueError(f"n must be <= beam_width ({self.beam_width}) under beam "
                             f"search, got {self.n}")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must be unset under beam search (beam_width sets how "
                             f"many beams run), got {self.best_of}")
        if self.stop:
            raise ValueError("stop strings are not supported with beam search; "
                             "use stop_token_ids")
        for name, off in _NOT_WITH_BEAMS.items():
            if getattr(self, name) != off:
                raise ValueError(f"{name} is not supported with beam search, got "
                                 f"{getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """The wire form; the fields left unset travel as None (the scheduler fills them).
        Its lists and map are this object's own (encoded at once, never changed)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                **dict.fromkeys(self._unset)}

    def sampler_params(self, eos_token_ids: frozenset[int] = frozenset()) -> "SamplerParams":
        """What the executor samples with (stop strings, lengths and counts stay here).
        ``eos_token_ids``: the model's, masked with ``stop_token_ids`` until ``min_tokens``."""
        stop_ids = set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))
        return SamplerParams(**{name: getattr(self, name) for name in _SAMPLER_FIELDS
                                if name != "stop_token_ids"},
                             stop_token_ids=sorted(stop_ids) if self.min_tokens else [])

    @classmethod
    def from_dict(cls, data: dict, defaults: dict | None = None) -> "SamplingParams":
        """Build from a wire dict; an unknown field is a ``ValueError`` naming it.
        ``defaults`` (a model's, keys of ``MODEL_DEFAULTS``) fill what ``data`` leaves unset."""
        if not isinstance(data, dict):
            raise ValueError(f"sampling params must be a map, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        filled = {name: value for name, value in (defaults or {}).items()
                  if data.get(name) is None}
        return cls(**{**data, **filled})


@dataclass(frozen=True)
class SamplerParams:
    """The part of a request's ``SamplingParams`` that the executor's sampler reads. Built by
    the scheduler from params it validated, so the executor checks only the map's shape.

    ``stop_token_ids``: the tokens masked while the output is shorter than ``min_tokens`` (the
    request's stop token ids and, unless it ignores EOS, the model's EOS); empty without
    ``min_tokens``."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    beam_width: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Whether a repetition, frequency or presence penalty applies."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    @functools.cached_property
    def argmax_only(self) -> bool:
        """Greedy, and nothing on top of the argmax: no beams, logprobs, logit bias or
        penalties (``min_tokens`` aside, which masks only the first tokens). Asked of every
        row at every step: computed once."""
        return (self.greedy and self.beam_width == 1 and self.logprobs is None
                and not self.logit_bias and not self.penalised)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerParams":
        """From a plan's map; a map that is not one is a ``ValueError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"sampler params must be a map, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _SAMPLER_FIELDS)
        if unknown:
            raise ValueError(f"unknown sampler parameter(s): {', '.join(unknown)}")
        return cls(**data)


_MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32
MAX_LOGPROBS = 20  # top tokens per position at most, as vLLM's default --max-logprobs
_SAMPLER_FIELDS = frozenset(f.name for f in fields(SamplerParams))
# The logits processors, each with the value that turns it off: beam search takes none.
_NOT_WITH_BEAMS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                   "logit_bias": {}, "min_tokens": 0}


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_number(name: str, value, low: float | None = None, low_inclusive: bool = True,
                  high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
