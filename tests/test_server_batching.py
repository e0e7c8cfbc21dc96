"""The server decodes concurrent requests in one batch: each client gets what it gets alone."""

import concurrent.futures as cf
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

import mlx_harmony_core as mhc  # noqa: E402
from mlx_harmony_core.server import ServerOptions  # noqa: E402
from mlx_harmony_core.testing import ServerThread  # noqa: E402


@pytest.fixture(scope="module")
def server():
    engine = mhc.load("demo", prefix_cache_entries=64)
    options = ServerOptions(model_name="demo", max_batch=8, max_queue=64, prefill_chunk=64)
    with ServerThread(engine, options) as url:
        yield engine, url


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def _body(i):
    """Client i's request: its own prompt, length, sampling and (for some) stop strings."""
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": f"client {i}: " + "go on " * (i * 3)}],
        "max_tokens": [7, 60, 23, 90, 41, 12, 75, 33][i % 8],
        "logit_bias": {"200002": -100, "200012": -100, "200007": -100},  # no early end
    }
    if i % 3 == 0:
        body.update(temperature=0.0)
    elif i % 3 == 1:
        body.update(temperature=0.9, top_p=0.9, seed=100 + i)
    else:
        body.update(temperature=0.7, seed=200 + i, presence_penalty=0.4, frequency_penalty=0.2)
    return body


def _ask(url, body, stream):
    c = _client(url)
    if not stream:
        r = c.chat.completions.create(**body)
        ch = r.choices[0]
        return ch.message.content or "", ch.finish_reason, r.usage.completion_tokens
    text, finish, used = "", None, None
    for chunk in c.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage:
            used = chunk.usage.completion_tokens
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish, used


def test_sixteen_clients_each_get_their_single_request_result(server):
    engine, url = server
    bodies = [_body(i) for i in range(16)]
    # Some clients stop on a string from their own reply (taken from a solo run).
    for i in (2, 5, 9, 13):
        text, _, _ = _ask(url, bodies[i], stream=False)
        bodies[i]["stop"] = [text[len(text) // 2 : len(text) // 2 + 3]]
    alone = [_ask(url, b, stream=i % 2 == 0) for i, b in enumerate(bodies)]  # one at a time
    for i in (2, 5, 9, 13):
        assert alone[i][1] == "stop"

    # Three more clients hang up mid-stream while the sixteen run.
    hung_up = []

    def quitter(i):
        body = {**_body(i), "max_tokens": 2000, "stream": True}
        with (
            httpx.Client(timeout=60) as h,
            h.stream("POST", url + "/v1/chat/completions", json=body) as r,
        ):
            for n, _ in enumerate(r.iter_lines()):
                if n == 10:
                    break
        hung_up.append(i)

    quitters = [threading.Thread(target=quitter, args=(100 + i,)) for i in range(3)]
    for t in quitters:
        t.start()
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: _ask(url, bodies[i], stream=i % 2 == 1), range(16)))
    for t in quitters:
        t.join(timeout=60)
    assert len(hung_up) == 3
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert b == a, f"client {i}: {b} != {a}"
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health").json()["queued"]:
        assert time.monotonic() < deadline, "disconnected requests kept running"


def test_batched_server_with_quantized_kv(tmp_path):
    engine = mhc.load("demo", cache_options={"kv_bits": 8})
    with ServerThread(engine, ServerOptions(model_name="demo", max_batch=4)) as url:
        bodies = [{**_body(i), "temperature": 0.0} for i in range(4)]
        alone = [_ask(url, b, stream=False) for b in bodies]
        with cf.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: _ask(url, b, stream=False), bodies))
        assert together == alone


def test_kv_budget_refuses_with_503(server):
    engine = mhc.load("demo")
    options = ServerOptions(model_name="demo", kv_budget_bytes=2**20)
    with ServerThread(engine, options) as url:
        body = {**_body(1), "max_tokens": 30000}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "kv_budget"
        assert "more than the budget" in r.json()["error"]["message"]
        ok = httpx.post(url + "/v1/chat/completions", json={**_body(1), "max_tokens": 3})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "--max-batch: must be >= 1"),
        (["--max-queue", "-1"], "--max-queue: must be >= 0"),
        (["--kv-budget-mb", "0"], "--kv-budget-mb: must be a number > 0"),
        (["--prefill-chunk", "x"], "--prefill-chunk: 'x' is not a whole number"),
    ],
)
def test_serve_batching_flags_are_checked(capsys, flags, message):
    from mlx_harmony_core.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *flags])
    assert message in capsys.readouterr().err


def test_serve_flags_reach_the_scheduler():
    from mlx_harmony_core.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--max-batch", "3", "--kv-budget-mb", "64", "--kv-bits", "8"]
    )
    assert (args.max_batch, args.kv_budget_mb, args.kv_bits, args.prefill_chunk) == (
        3,
        64.0,
        8,
        128,
    )
