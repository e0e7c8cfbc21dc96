"""Through the server: a client's bad request (refused, or failing inside a shared decode
step) never changes what the clients decoding beside it receive."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import threading

import httpx
import pytest

openai = pytest.importorskip("openai")

import mlx.core as mx  # noqa: E402,I001

import mlx_harmony_core as mhc  # noqa: E402
from support.bad_requests import BAD_BODIES  # noqa: E402
from mlx_harmony_core.errors import InvalidRequestError  # noqa: E402
from mlx_harmony_core.server import ServerOptions  # noqa: E402
from mlx_harmony_core.testing import ServerThread  # noqa: E402

NO_END = {"200002": -100, "200012": -100, "200007": -100}


def _inject(engine):
    """Requests whose message says ``FAIL:<kind>:<token>`` bring a logits processor that
    fails that way at that reply token (the server has no field for processors)."""
    plain = engine.request

    def request(messages, params=None, **options):
        marker = re.search(r"FAIL:(\w+):(\d+)", json.dumps(messages))
        if marker:
            kind, at = marker[1], int(marker[2])
            state = {"n": 0}

            def fn(tokens, logits):
                k = state["n"]
                state["n"] += 1
                if k != at:
                    return logits
                if kind == "raise":
                    raise RuntimeError("the processor broke")
                if kind == "invalid":
                    raise InvalidRequestError("this request's own mistake", param="messages")
                if kind == "shape":
                    return logits[:, :7]
                return logits * mx.nan

            options["logits_processors"] = [fn]
        return plain(messages, params, **options)

    engine.request = request


@pytest.fixture(scope="module")
def server():
    engine = mhc.load("demo", prefix_cache_entries=0)
    _inject(engine)
    options = ServerOptions(model_name="demo", max_batch=8, max_queue=64, prefill_chunk=32)
    with ServerThread(engine, options) as url:
        yield url


def _body(i):
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": f"client {i}: " + "go on " * (i * 2)}],
        "max_tokens": [12, 30, 21, 40, 9, 25, 33, 17][i % 8],
        "logit_bias": NO_END,
    }
    if i % 2:
        body.update(temperature=0.8, top_p=0.9, seed=50 + i)
    else:
        body.update(temperature=0.0)
    return body


def _ask(url, body, stream):
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    if not stream:
        r = c.chat.completions.create(**body)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in c.chat.completions.create(**body, stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


@pytest.fixture(scope="module")
def alone(server):
    return [_ask(server, _body(i), stream=False) for i in range(8)]


def _good_together(url, alone, bad):
    """8 good clients (half streaming) with ``bad()`` run beside them; the good ones must
    each get exactly their solo result."""
    with cf.ThreadPoolExecutor(9) as pool:
        good = [pool.submit(_ask, url, _body(i), i % 2 == 1) for i in range(8)]
        bad_result = pool.submit(bad)
        results = [f.result(timeout=300) for f in good]
        out = bad_result.result(timeout=300)
    for i, (got, want) in enumerate(zip(results, alone, strict=True)):
        assert got == want, f"client {i}: {got} != {want}"
    return out


def _raw(url, body, stream):
    """(status, error message) of a request: for a stream, of its error event."""
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        return r.status_code, r.json().get("error", {}).get("message")
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=300
    ) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()["error"]["message"]
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: {")]
    errors = [json.loads(x)["error"] for x in lines if '"error"' in x]
    return 200, errors[0]["message"] if errors else None


@pytest.mark.parametrize(
    "kind, at, status, needle",
    [
        ("raise", 0, 500, "the processor broke"),
        ("raise", 6, 500, "the processor broke"),
        ("invalid", 0, 400, "own mistake"),
        ("invalid", 6, 400, "own mistake"),
        ("shape", 0, 400, "logits processor returned"),
        ("shape", 6, 400, "logits processor returned"),
        ("nan", 0, 500, "NaN"),
        ("nan", 6, 500, "NaN"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_row_failing_in_a_step_fails_alone(server, alone, kind, at, status, needle, stream):
    body = {
        "messages": [{"role": "user", "content": f"FAIL:{kind}:{at}"}],
        "max_tokens": 30,
        "logit_bias": NO_END,
        "temperature": 0.0,
    }
    code, message = _good_together(server, alone, lambda: _raw(server, body, stream))
    # A stream that failed after its first event ends with an error event; one that fails
    # before it (a reply's first tokens are Harmony headers: no text) gets the status.
    assert code == status or (stream and at > 0 and code == 200), (code, message)
    assert message is not None and needle in message


def test_bad_bodies_sent_while_eight_clients_stream(server, alone):
    errors = []

    def battery():
        for body, needle in [
            *BAD_BODIES,
            ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"201088": 5}}, ""),
        ]:
            r = httpx.post(
                server + "/v1/chat/completions",
                content=json.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            if r.status_code != 400 or needle not in r.json()["error"]["message"]:
                errors.append((body, r.status_code, r.text))

    threads = [threading.Thread(target=battery) for _ in range(2)]
    out = _good_together(
        server, alone, lambda: [t.start() for t in threads] and [t.join() for t in threads]
    )
    assert out is not None and not errors, errors
