"""Stand-in models for tests: a model that emits a chosen token sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx


class _Position:
    """The only state a scripted model needs: how many tokens it has seen."""

    def __init__(self) -> None:
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return []


class ScriptedModel:
    """A model with mlx-lm's calling convention whose greedy output follows ``script``.

    The k-th token generated after a prompt of ``prompt_length`` tokens is ``script[k]``
    (or, with ``replies``, the k-th token of the n-th request's reply);
    past the end of the script it emits ``filler``. Logits put ``margin`` on the scripted id
    over a flat background, so any sampler with a sane temperature picks it.
    """

    def __init__(
        self,
        script: Sequence[int] = (),
        prompt_length: int | None = None,
        *,
        replies: Sequence[Sequence[int]] | None = None,
        vocab_size: int = 201088,
        filler: int = 13,
        margin: float = 50.0,
    ) -> None:
        self.script = list(script)
        self.prompt_length = prompt_length or 0
        # With ``replies``, each request (a call on a fresh cache) plays the next reply, and
        # the prompt length is learnt from the prefill (the engine prefills all but one).
        self.replies = [list(r) for r in replies] if replies is not None else None
        self.requests = 0
        self.vocab_size = vocab_size
        self.filler = filler
        self.margin = margin
        self.layers: list[Any] = []
        self.calls: list[int] = []  # input length of each call, for tests of prefill reuse

    def make_cache(self) -> list[Any]:
        return [_Position()]

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        batch, length = inputs.shape
        self.calls.append(length)
        pos = cache[0] if cache else _Position()
        start = pos.offset
        pos.offset += length
        if self.replies is not None:
            if start == 0:
                self.script = self.replies[min(self.requests, len(self.replies) - 1)]
                self.requests += 1
            if length > 1:
                self.prompt_length = start + length + 1
        ids = [self._token_at(start + i) for i in range(length)]
        one_hot = mx.array(ids)[:, None] == mx.arange(self.vocab_size)[None, :]
        logits = mx.where(one_hot, self.margin, 0.0).astype(mx.float32)
        return mx.broadcast_to(logits[None], (batch, length, self.vocab_size))

    def _token_at(self, position: int) -> int:
        k = position - (self.prompt_length - 1)
        return self.script[k] if 0 <= k < len(self.script) else self.filler
