"""Sampling parameters of one request, shaped like vLLM's ``SamplingParams``.

Validated at construction on the client and again on the scheduler (``from_dict``),
so a bad value is a ``ValueError`` that names the field wherever it enters. The executor
receives only ``SamplerParams``, what it samples with, already validated.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class SamplingParams:
    """How to sample the completions of one request.

    n: completions to return. best_of: completions to generate, the best ``n`` returned.
    temperature: 0 means greedy. top_p: nucleus mass in (0, 1]. top_k: 0 (or -1) disables.
    seed: per-request seed; a seeded request samples the same tokens whatever else is batched.
    max_tokens: new tokens at most. stop: strings that end the output (not included in it).
    stop_token_ids: token ids that end the output. ignore_eos: keep going past EOS.
    logprobs: also return the top-N logprobs of every position (the sampled token's always).
    beam_width > 1: beam search with ``length_penalty`` and ``early_stopping`` (transformers'
    semantics); it is deterministic, so temperature, top_p, top_k and seed do not apply,
    and it returns the ``n`` best of its finished hypotheses.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        _check_int("n", self.n, low=1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, low=self.n)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_inclusive=False, high=1.0)
        _check_int("top_k", self.top_k, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        _check_int("max_tokens", self.max_tokens, low=1)
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        for i, t in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", t, low=0, high=_MAX_TOKEN_ID)
        _check_bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=20)
        _check_int("beam_width", self.beam_width, low=1)
        _check_number("length_penalty", self.length_penalty)
        _check_bool("early_stopping", self.early_stopping)
        if self.beam_width > 1:
            self._validate_beam_search()

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

    def to_dict(self) -> dict:
        return asdict(self)

    def sampler_params(self) -> "SamplerParams":
        """What the executor samples with (stop strings, lengths and counts stay here)."""
        return SamplerParams(**{name: getattr(self, name) for name in _SAMPLER_FIELDS})

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """Build from a wire dict; an unknown field is a ``ValueError`` naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"sampling params must be a map, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class SamplerParams:
    """The part of a request's ``SamplingParams`` that the executor's sampler reads. Built by
    the scheduler from params it validated, so the executor checks only the map's shape."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None
    beam_width: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

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
_SAMPLER_FIELDS = frozenset(f.name for f in fields(SamplerParams))


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_number(name: str, value, low: float | None = None, low_inclusive: bool = True,
                  high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
