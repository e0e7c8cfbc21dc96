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


def real_model_or_skip(name: str = "smollm2") -> Any:
    """For test fixtures: the real model's path (see :mod:`.real_models`); when it cannot be
    fetched the test is skipped, except in CI (``CI`` set), where that is a failure."""
    import os

    import pytest

    from .models.real_models import fetch_test_model

    try:
        return fetch_test_model(name)
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the real model {name!r} could not be fetched: {exc}")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """The real server (uvicorn) for ``engine`` on a free loopback port, in this process.

    ``with ServerThread(engine, options) as base_url: ...``; generation runs on the
    package's generation thread, the event loop on this helper's thread.
    """

    def __init__(self, engine: Any, options: Any = None) -> None:
        import uvicorn

        from .server import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(engine, options), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self._thread: Any = None

    def __enter__(self) -> str:
        import threading
        import time

        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
