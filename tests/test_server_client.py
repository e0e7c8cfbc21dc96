"""The server's engine seam: anything that implements ``EngineClient`` can be served.

A test double (no model, no scheduler) echoes the last user message back, word by word,
from a thread of its own, as an engine's generation thread would.
"""

import threading
from collections.abc import Sequence
from typing import Any

import httpx

from mlx_harmony_core.request import Completion, StreamEvent, Timings, Usage
from mlx_harmony_core.server import END, EngineClient, ServerOptions
from mlx_harmony_core.testing import ServerThread


class EchoClient:
    """An ``EngineClient`` that answers with the last user message."""

    context_length = 64

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.shut = threading.Event()

    @property
    def pending(self) -> int:
        return 0

    def request(self, prompt: Any, params: Any, **options: Any) -> Any:
        self.requests.append({"prompt": prompt, "params": params, **options})
        return prompt

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def token_bytes(self) -> Sequence[bytes]:
        return [bytes([i]) for i in range(256)]

    def submit(self, request: Any, sink: Any) -> Any:
        words = request[-1]["content"].split(" ")

        def run() -> None:
            for i, word in enumerate(words):
                sink(StreamEvent(delta=word if i == 0 else " " + word))
            usage = Usage(prompt_tokens=len(words), completion_tokens=len(words))
            done = Completion(" ".join(words), "", [], "stop", usage, Timings())
            sink(StreamEvent(completion=done, finish_reason="stop"))
            sink(END)

        threading.Thread(target=run, daemon=True).start()
        return self

    def cancel(self) -> None:
        pass

    def shutdown(self) -> None:
        self.shut.set()

    def wait_idle(self, timeout: float) -> bool:
        return True


def test_a_test_double_serves_chat_completions():
    client = EchoClient()
    assert isinstance(client, EngineClient)
    body = {"messages": [{"role": "user", "content": "hello there world"}], "max_tokens": 5}
    with ServerThread(client, ServerOptions(model_name="echo", web=False)) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["message"]["content"] == "hello there world"
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["total_tokens"] == 6 and out["model"] == "echo"
        assert client.requests[0]["max_tokens"] == 5

        with httpx.stream(
            "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30
        ) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert r.headers["content-type"].startswith("text/event-stream")

        models = httpx.get(url + "/v1/models", timeout=30).json()
        assert models["data"][0]["context_length"] == 64
        assert httpx.get(url + "/health", timeout=30).json()["queued"] == 0


def test_typed_event_framing():
    from mlx_harmony_core.server import CHUNKS, TYPED_EVENTS, APIError

    item = {"type": "response.output_text.delta", "delta": "hé"}
    assert TYPED_EVENTS.frame(item) == (
        b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
        b'"delta": "h\xc3\xa9"}\n\n'
    )
    assert CHUNKS.frame({"a": 1}) == b'data: {"a": 1}\n\n' and CHUNKS.done == b"data: [DONE]\n\n"
    err = APIError(500, "boom", type="server_error", code="x")
    assert TYPED_EVENTS.error(err)["type"] == "error" and TYPED_EVENTS.done == b""
    assert CHUNKS.error(err) == {"error": {"message": "boom", "type": "server_error", "code": "x"}}
