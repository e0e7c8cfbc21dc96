"""Validated configuration objects (Pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How the next token is chosen from the model's logits.

    Attributes:
        temperature: Softmax temperature; ``0`` means greedy (argmax).
        seed: Seed of the counter-based RNG. The same seed, params and logits give the
            same tokens in any process or thread. ``None`` draws a fresh seed per sampler.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**64)
