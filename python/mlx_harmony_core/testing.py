"""What tests and benchmarks share: a model that emits a chosen token sequence, random LoRA
adapters, the server on a thread or as a process."""

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


class ServerProcess:
    """An OpenAI-compatible server (ours, or a peer's such as ``mlx_lm server``) started as
    its own process from ``command``, listening on ``port``; ready once ``/v1/models``
    answers. ``close()`` (or leaving the ``with`` block) stops it."""

    def __init__(self, command: Sequence[str], port: int, timeout_s: float = 300) -> None:
        import os
        import subprocess
        import time

        import httpx

        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            list(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server {' '.join(command[:4])}... did not start")
            time.sleep(0.3)

    def close(self) -> None:
        """Stop the process (terminate, then kill after 20 s)."""
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.close()


LORA_CONFIG: dict[str, Any] = {
    "fine_tune_type": "lora",
    "num_layers": 2,
    "lora_parameters": {
        "rank": 4,
        "scale": 4.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"],
    },
}


def write_adapters(out: Any, seed: int, config: dict[str, Any] | None = None) -> Any:
    """Write random LoRA weights for the demo model into the directory ``out``, as mlx-lm
    writes them (``adapters.safetensors`` + ``adapter_config.json``, ``config`` defaulting
    to :data:`LORA_CONFIG`); returns ``out``."""
    import json
    from pathlib import Path

    from mlx.utils import tree_flatten
    from mlx_lm import load as lm_load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from .models.builder import demo_model_path

    config = config or LORA_CONFIG
    out = Path(out)
    model, _ = lm_load(str(demo_model_path()))
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    mx.random.seed(seed)
    params = dict(tree_flatten(model.trainable_parameters()))
    params = {k: mx.random.normal(v.shape) * 0.05 for k, v in params.items()}
    if not params or not all("lora_" in k for k in params):
        raise RuntimeError("linear_to_lora_layers made no LoRA parameters")
    mx.save_safetensors(str(out / "adapters.safetensors"), params)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
