"""The Python face of the C++ sampler."""

from __future__ import annotations

import secrets
import threading

import mlx.core as mx
import numpy as np

from . import _core
from .config import SamplingParams


def check_ids(ids: mx.array) -> mx.array:
    """Raise ``ValueError`` for rows the kernel flagged; return ``ids`` unchanged otherwise."""
    values = np.asarray(ids).reshape(-1)
    if values.size and values.min() < 0:
        row = int(np.argmax(values < 0))
        if values[row] == _core.ERROR_NON_FINITE:
            raise ValueError(
                f"logits row {row} contains NaN or +inf; check the model's output dtype "
                "and the logit bias you passed"
            )
        raise ValueError(f"logits row {row} is -inf everywhere: no token can be sampled")
    return ids


class Sampler:
    """Draws token ids from logits with the C++ fused sampler.

    ``Sampler(params)(logits)`` accepts logits of shape ``(V,)`` or ``(B, V)`` in float32,
    float16 or bfloat16 and returns int32 ids of shape ``()`` or ``(B,)``. Each call advances
    the draw counter, so a seeded sampler reproduces the same sequence of draws.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self._counter = 0
        self._lock = threading.Lock()

    def _next_counter(self) -> int:
        with self._lock:
            counter = self._counter
            self._counter += 1
        return counter

    def lazy(self, logits: mx.array) -> mx.array:
        """Build the sampling op without evaluating it (for pipelined decoding).

        Negative ids in the result flag bad rows; pass the evaluated ids to
        :func:`check_ids`.
        """
        if not isinstance(logits, mx.array):
            raise TypeError(f"logits must be an mx.array, got {type(logits).__name__}")
        return _core.sample(
            logits,
            temperature=self.params.temperature,
            seed=self.seed,
            counter=self._next_counter(),
        )

    def __call__(self, logits: mx.array) -> mx.array:
        """Sample and evaluate; raises ``ValueError`` on NaN/inf or all -inf rows."""
        ids = self.lazy(logits)
        mx.eval(ids)
        return check_ids(ids)
