"""Validated configuration objects (Pydantic)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """How the next token is chosen from the model's logits.

    Applied in this order (the HF / vLLM order: temperature first; mlx-lm instead filters
    log-probabilities at temperature 1 and divides by the temperature last):

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

    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 = off")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="0 = off")
    min_tokens_to_keep: int = Field(1, ge=1)
    xtc_probability: float = Field(0.0, ge=0.0, le=1.0)
    xtc_threshold: float = Field(0.1, ge=0.0, le=0.5)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    repetition_context_size: int = Field(64, ge=1, le=1_000_000)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if not v:
            return None
        for token, bias in v.items():
            if token < 0:
                raise ValueError(f"logit_bias token id {token} is negative")
            if not math.isfinite(bias) or abs(bias) > 100:
                raise ValueError(f"logit_bias[{token}] = {bias} must be finite and in [-100, 100]")
        return v

    @property
    def uses_history(self) -> bool:
        """True when a penalty needs the previous tokens."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
