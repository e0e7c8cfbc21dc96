"""``SamplingParams``: the one source of every sampling field's name, default, limits and help.

The CLI flags, prompt-config fields, chat ``\\set``, the server's request fields, the bench
flags and the C++ ``SamplingOptions`` are all derived from :data:`SamplingParams.model_fields`;
:func:`describe` words a field's limits once, so every surface rejects a value the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequestError

INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**63  # seeds fit a signed 64-bit integer (JSON clients, C++ uint64 alike)
BIAS_LIMIT = 100.0


class SamplingParams(BaseModel):
    """How the next token is chosen from the model's logits.

    Applied in this order (the HF / vLLM order: temperature first; mlx-lm instead filters
    log-probabilities at temperature 1 and divides by the temperature last):

    0. a token mask (structured outputs), when a request has one: masked tokens are never drawn;
    1. ``logit_bias`` is added to the logits;
    2. ``repetition_penalty`` (logits > 0 divided, < 0 multiplied), ``presence_penalty``
       (subtracted once) and ``frequency_penalty`` (subtracted per occurrence) for the ids in
       the last ``repetition_context_size`` tokens of the history;
    3. ``temperature``: ``0`` is greedy (argmax of the processed logits; filters are skipped);
    4. ``top_k``: keep the k most likely tokens (ties with the k-th are kept);
    5. ``top_p``: keep the smallest most-likely set whose probability reaches ``top_p``
       (ties at the boundary are kept);
    6. ``min_p``: keep tokens whose probability is at least ``min_p`` times the top one;
       top-p and min-p always keep ``min_tokens_to_keep`` tokens;
    7. XTC: with probability ``xtc_probability``, drop every token whose probability exceeds
       ``xtc_threshold`` except the least likely of them;
    8. draw from the renormalized distribution with a counter-based RNG keyed by ``seed``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(
        1.0, ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy (default 1.0)"
    )
    top_k: int = Field(0, ge=0, le=INT32_MAX, description="keep the k most likely; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass to keep; 1 = off")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="relative to the top token; 0 = off")
    min_tokens_to_keep: int = Field(
        1, ge=1, le=INT32_MAX, description="top-p and min-p keep at least this many"
    )
    xtc_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="chance per token of applying XTC; 0 = off"
    )
    xtc_threshold: float = Field(
        0.1, ge=0.0, le=0.5, description="XTC drops tokens above this probability"
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=100.0, allow_inf_nan=False, description="1 = off"
    )
    repetition_context_size: int = Field(
        64, ge=1, le=1_000_000, description="tokens the penalties look back on"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="0 = off")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="0 = off")
    logit_bias: dict[int, float] | None = Field(
        None, description="token id -> bias in [-100, 100] ('ID:BIAS,...' or JSON)"
    )
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="seed for reproducible sampling"
    )

    @field_validator("top_p", "repetition_penalty")
    @classmethod
    def _positive_in_float32(cls, v: float) -> float:
        # The sampler computes in float32: a value that rounds to 0 there is not > 0.
        if v > 0 and float(np.float32(v)) <= 0.0:
            raise ValueError("rounds to 0 in float32")
        return v

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, v: float) -> float:
        # 1 / T overflows float32 below ~1e-38; far before that the draw is the argmax.
        return 0.0 if 0 < v < 1e-6 else v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if not v:
            return None
        for token, bias in v.items():
            if not 0 <= token <= INT32_MAX:
                raise ValueError(f"token id {token} is outside [0, {INT32_MAX}]")
            if not math.isfinite(bias) or abs(bias) > BIAS_LIMIT:
                raise ValueError(f"bias {bias} of token {token} is not in [-100, 100]")
        return v

    @property
    def uses_history(self) -> bool:
        """True when a penalty needs the previous tokens."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


FIELDS = tuple(SamplingParams.model_fields)


def constraints(name: str) -> dict[str, Any]:
    """The Field limits of ``name`` (``ge``, ``gt``, ``le``, ``lt``, ``allow_inf_nan``)."""
    out: dict[str, Any] = {}
    for m in SamplingParams.model_fields[name].metadata:
        for key in ("ge", "gt", "le", "lt", "allow_inf_nan"):
            value = getattr(m, key, None)
            if value is not None:
                out[key] = value
    return out


def _num(v: Any) -> str:
    if isinstance(v, int) and abs(v) >= 2**20:
        exp = int(math.log2(v + 1)) if v > 0 else 0
        return f"2**{exp}" if 2**exp == v else (f"2**{exp}-1" if 2**exp - 1 == v else str(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe(name: str, limits: Mapping[str, Any] | None = None) -> str:
    """``must be a number in [0, 100]``: the words every surface uses for ``name``'s limits."""
    if name == "logit_bias":
        return f"must map token ids in [0, {_num(INT32_MAX)}] to biases in [-100, 100]"
    c = dict(constraints(name) if limits is None else limits)
    kind = "an integer" if field_type(name) is int else "a number"
    lo = ("[", c["ge"]) if "ge" in c else ("(", c["gt"]) if "gt" in c else None
    hi = ("]", c["le"]) if "le" in c else (")", c["lt"]) if "lt" in c else None
    if lo and hi:
        return f"must be {kind} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"must be {kind} {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f"must be {kind} {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return f"must be {kind}"


def field_type(name: str) -> type:
    """The value type of ``name`` (``int``, ``float`` or ``dict``)."""
    ann = SamplingParams.model_fields[name].annotation
    args = getattr(ann, "__args__", None)
    if args:
        ann = next(a for a in args if a is not type(None))
    return getattr(ann, "__origin__", ann)


def problems(
    exc: ValidationError,
    display: Callable[[str], str] = str,
    limits: Callable[[str], Mapping[str, Any] | None] = lambda name: None,
) -> list[tuple[str | None, str]]:
    """``(field, message)`` for each error, sampling fields worded by :func:`describe`."""
    out: list[tuple[str | None, str]] = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"]]
        name = loc[0] if loc else None
        if name in SamplingParams.model_fields:
            got = e.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            if e["type"] == "value_error" and name != "logit_bias":  # a validator's reason
                shown = shown[:-1] + f": {e['ctx']['error']})" if shown else shown
            out.append((name, f"{display(name)} {describe(name, limits(name))}{shown}"))
        elif e["type"] == "value_error" and not loc:  # a model validator's own words
            out.append((None, str(e["ctx"]["error"])))
        elif e["type"] == "extra_forbidden" and loc:
            out.append((name, f"unknown field {loc[-1]!r}"))
        else:
            where = ".".join(loc)
            out.append((name, f"{display(where) if where else 'value'}: {e['msg']}"))
    return out


def sampling_params(
    values: Mapping[str, Any], display: Callable[[str], str] = str
) -> SamplingParams:
    """:class:`SamplingParams` from the fields set in ``values`` (``None`` = default).

    Raises :class:`InvalidRequestError` worded for the surface by ``display``
    (``--temperature``, ``temperature``, ...).
    """
    fields = {k: v for k, v in values.items() if v is not None}
    try:
        return SamplingParams(**fields)
    except ValidationError as exc:
        found = problems(exc, display)
        raise InvalidRequestError("; ".join(m for _, m in found), param=found[0][0]) from None
