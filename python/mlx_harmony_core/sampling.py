"""The Python face of the C++ fused sampler."""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import _core
from .errors import InvalidRequestError, RequestTypeError
from .params import SamplingParams

History = Sequence[int] | Sequence[Sequence[int]] | np.ndarray | mx.array | None
Mask = np.ndarray | mx.array | None


def options(params: SamplingParams, seed: int) -> _core.SamplingOptions:
    """The C++ options for ``params``: every field the struct binds, by name (one place)."""
    out = _core.SamplingOptions()
    for name in SamplingParams.model_fields:
        if hasattr(out, name) and name != "seed":
            setattr(out, name, getattr(params, name))
    out.seed = seed
    return out


def pack_mask(allowed: np.ndarray) -> np.ndarray:
    """A boolean (V,) or (B, V) array of allowed tokens as the sampler's packed bitmask
    (32 tokens per uint32, least significant bit first: llguidance's layout)."""
    allowed = np.asarray(allowed, dtype=bool)
    pad = (-allowed.shape[-1]) % 32
    if pad:
        allowed = np.concatenate([allowed, np.zeros((*allowed.shape[:-1], pad), bool)], -1)
    return np.packbits(allowed, axis=-1, bitorder="little").view(np.uint32)


def as_mask(mask: np.ndarray | mx.array) -> mx.array:
    """A packed mask as the uint32 MLX array the sampler takes."""
    if isinstance(mask, mx.array):
        return mask
    return mx.array(np.ascontiguousarray(mask, dtype=np.uint32))


@dataclass
class LogProbs:
    """Log-probabilities of the model's raw distribution for the sampled tokens.

    ``logprob`` has shape () or (B,); ``top_ids`` and ``top_logprobs`` (n,) or (B, n),
    most likely first.
    """

    logprob: mx.array
    top_ids: mx.array
    top_logprobs: mx.array


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
        raise ValueError(
            f"logits row {row} is -inf everywhere (or every finite token is masked): "
            "no token can be sampled"
        )
    return ids


class Sampler:
    """Draws token ids from logits with the C++ fused sampler (see :class:`SamplingParams`).

    ``Sampler(params)(logits, history)`` accepts logits of shape ``(V,)`` or ``(B, V)`` in
    float32, float16 or bfloat16 and returns int32 ids of shape ``()`` or ``(B,)``. ``history``
    holds the previous token ids the penalties look at: one sequence, or one per row. Each call
    advances a draw counter, so a seeded sampler reproduces the same sequence of draws in any
    process. On a GPU stream the same distribution is computed with MLX ops.
    """

    def __init__(self, params: SamplingParams | None = None, *, kernel: bool | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        if not isinstance(self.params, SamplingParams):
            raise RequestTypeError("params must be a SamplingParams")
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.kernel = kernel
        self._counter = 0
        self._lock = threading.Lock()
        bias = self.params.logit_bias or {}
        self._bias_ids = mx.array(list(bias.keys()), dtype=mx.int32) if bias else None
        self._bias_values = mx.array(list(bias.values()), dtype=mx.float32) if bias else None
        self._max_bias_id = max(bias) if bias else -1
        self._options = options(self.params, self.seed)

    def _history(self, history: History, rows: int, batched: bool, vocab: int) -> mx.array | None:
        if history is None or not self.params.uses_history:
            return None
        window = self.params.repetition_context_size
        if (
            isinstance(history, mx.array)
            and history.dtype == mx.int32
            and history.shape == (rows, window)
        ):
            return history  # a prepared window (see window()): stays lazy, no sync
        if isinstance(history, mx.array):
            history = np.asarray(history)
        if isinstance(history, np.ndarray):
            seqs = [history] if history.ndim == 1 else list(history)
        elif batched and len(history) and not isinstance(history[0], int | np.integer):
            seqs = [np.asarray(h, dtype=np.int64) for h in history]
        else:
            seqs = [np.asarray(history, dtype=np.int64)]
        if len(seqs) == 1 and rows > 1:
            seqs = seqs * rows
        if len(seqs) != rows:
            raise InvalidRequestError(f"history has {len(seqs)} rows but logits have {rows}")
        out = np.full((rows, window), -1, dtype=np.int32)
        for r, seq in enumerate(seqs):
            tail = np.asarray(seq, dtype=np.int64).reshape(-1)[-window:]
            if tail.size and (tail.min() < 0 or tail.max() >= vocab):
                raise InvalidRequestError(f"history row {r} has token ids outside [0, {vocab})")
            if tail.size:
                out[r, window - tail.size :] = tail
        return mx.array(out)

    def window(self, tokens: Sequence[int], rows: int = 1) -> mx.array | None:
        """The penalty window for ``tokens`` as a (rows, W) int32 array padded with -1.

        Pass it as ``history`` and advance it with :meth:`advance`; it stays a lazy MLX array,
        so a pipelined decode loop never waits for the token it just sampled.
        """
        if not self.params.uses_history:
            return None
        w = self.params.repetition_context_size
        tail = list(tokens)[-w:]
        row = [-1] * (w - len(tail)) + tail
        return mx.array([row] * rows, dtype=mx.int32)

    @staticmethod
    def advance(window: mx.array | None, ids: mx.array) -> mx.array | None:
        """Slide ``window`` by the ids just sampled (lazy)."""
        if window is None:
            return None
        return mx.concatenate([window[:, 1:], ids.reshape(-1, 1).astype(mx.int32)], axis=1)

    def check(self, vocab: int, logprobs: int | None = None) -> None:
        """Raise :class:`InvalidRequestError` when the settings do not fit a vocabulary."""
        if self._max_bias_id >= vocab:
            raise InvalidRequestError(
                f"logit_bias has token id {self._max_bias_id}, outside the vocabulary of {vocab}",
                param="logit_bias",
            )
        if self.params.top_k > vocab:
            raise InvalidRequestError(
                f"top_k ({self.params.top_k}) is larger than the vocabulary ({vocab})",
                param="top_k",
            )
        if logprobs is not None and not (0 <= logprobs <= vocab):
            raise InvalidRequestError(
                f"logprobs must be in [0, {vocab}], got {logprobs}", param="logprobs"
            )

    def next_options(self, logprobs: int | None = None) -> _core.SamplingOptions:
        """The C++ options for the next draw (a copy): the draw counter is taken and
        advanced, so draw n of a seeded sampler is keyed the same wherever it runs."""
        with self._lock:
            self._options.counter = self._counter
            self._options.logprobs = -1 if logprobs is None else logprobs
            self._counter += 1
            return copy.copy(self._options)

    @property
    def bias(self) -> tuple[mx.array | None, mx.array | None]:
        """The logit bias as (ids int32, values float32), or (None, None)."""
        return self._bias_ids, self._bias_values

    def lazy(
        self,
        logits: mx.array,
        history: History = None,
        *,
        logprobs: int | None = None,
        mask: Mask = None,
    ) -> mx.array | tuple[mx.array, LogProbs]:
        """Build the sampling op without evaluating it (for pipelined decoding).

        Negative ids in the result flag bad rows: pass the evaluated ids to :func:`check_ids`.
        With ``logprobs=n`` returns ``(ids, LogProbs)`` with the top ``n`` alternatives.
        ``mask`` is a packed bitmask of allowed tokens per row (see :func:`pack_mask`),
        applied before every other control: masked tokens are never drawn.
        """
        if not isinstance(logits, mx.array):
            raise RequestTypeError(f"logits must be an mx.array, got {type(logits).__name__}")
        if logits.ndim not in (1, 2):
            raise InvalidRequestError(f"logits must have shape (V,) or (B, V), got {logits.shape}")
        vocab = logits.shape[-1]
        self.check(vocab, logprobs)
        rows = logits.shape[0] if logits.ndim == 2 else 1
        hist = self._history(history, rows, logits.ndim == 2, vocab)
        if mask is not None:
            mask = as_mask(mask)
            if mask.ndim == 1 and logits.ndim == 2:
                mask = mask.reshape(1, -1)  # one row's mask for every row
            if mask.ndim == 2 and mask.shape[0] == 1 and rows > 1:
                mask = mx.broadcast_to(mask, (rows, mask.shape[1]))
        outs = _core.sample(
            logits,
            hist,
            self._bias_ids,
            self._bias_values,
            self.next_options(logprobs),
            mask=mask,
            kernel=self.kernel,
        )
        if logprobs is None:
            return outs[0]
        return outs[0], LogProbs(outs[1], outs[2], outs[3])

    def __call__(
        self,
        logits: mx.array,
        history: History = None,
        *,
        logprobs: int | None = None,
        mask: Mask = None,
    ) -> mx.array | tuple[mx.array, LogProbs]:
        """Sample and evaluate; raises ``ValueError`` on NaN/inf or all -inf rows."""
        out = self.lazy(logits, history, logprobs=logprobs, mask=mask)
        mx.eval(out if isinstance(out, mx.array) else [out[0], *vars(out[1]).values()])
        check_ids(out if isinstance(out, mx.array) else out[0])
        return out


def sample_rows(
    logits: mx.array,
    options: Sequence[_core.SamplingOptions],
    *,
    history: mx.array | None = None,
    bias: tuple[mx.array, mx.array, mx.array] | None = None,
    mask: mx.array | None = None,
    kernel: bool | None = None,
) -> tuple[mx.array, LogProbs | None]:
    """One draw per row of ``logits`` (B, V), row b with ``options[b]`` (lazy): a batch
    of independent requests in one call. ``bias`` is (ids, values, offsets) with row b's
    bias at ``offsets[b]:offsets[b + 1]``. A row's draws depend only on its own seed and
    counter, never on its row or its neighbours. Logprobs (when any row asks) come back
    ``max(logprobs)`` wide."""
    ids_, values, offsets = bias if bias is not None else (None, None, None)
    outs = _core.sample_rows(
        logits, history, ids_, values, offsets, list(options), mask=mask, kernel=kernel
    )
    if len(outs) == 1:
        return outs[0], None
    return outs[0], LogProbs(outs[1], outs[2], outs[3])
