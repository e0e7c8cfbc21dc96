"""The OpenAI-compatible server, started for real on loopback and used with the `openai` SDK."""

import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

import mlx_harmony_core as mhc  # noqa: E402
from mlx_harmony_core.server import ServerOptions  # noqa: E402
from mlx_harmony_core.testing import ScriptedModel, ServerThread, free_port  # noqa: E402

KEY = "sk-test"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def demo():
    engine = mhc.load("demo", prefix_cache_entries=64, prefix_cache_bytes=2**30)
    with ServerThread(engine, ServerOptions(model_name="demo", api_key=KEY, max_queue=32)) as url:
        yield engine, url


@pytest.fixture(scope="module")
def scripted(encoding):
    model = ScriptedModel(replies=[[]])
    engine = mhc.Engine(model, encoding=encoding, context_length=2048)
    with ServerThread(engine, ServerOptions(model_name="scripted")) as url:
        yield model, url


def client(url, key=KEY, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)


def script(model, encoding, *replies):
    model.replies = [list(encoding.encode(r, allowed_special="all")) for r in replies]
    model.requests = 0


MSG = [{"role": "user", "content": "Hello"}]


def test_chat_non_streaming_usage_and_models(demo):
    engine, url = demo
    c = client(url)
    r = c.chat.completions.create(model="demo", messages=MSG, max_tokens=6, seed=1)
    assert r.object == "chat.completion" and r.model == "demo"
    choice = r.choices[0]
    assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(engine.render(MSG))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert [m.id for m in c.models.list().data] == ["demo"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_stream_equals_non_stream_for_the_same_seed(demo):
    _, url = demo
    c = client(url)
    args = dict(model="demo", messages=MSG, max_tokens=80, seed=42, temperature=0.9, top_p=0.95)
    whole = c.chat.completions.create(**args)
    pieces, usage, finish = [], None, None
    for chunk in c.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    # incremental, not one blob (a random model's first 48 tokens are held as a would-be header)
    assert len([p for p in pieces if p]) > 10
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "length" and usage.completion_tokens == 80


def test_all_sampling_params_are_accepted(demo):
    _, url = demo
    c = client(url)
    r = c.chat.completions.create(
        model="demo",
        messages=MSG,
        max_completion_tokens=4,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"13": -100},
        seed=3,
        stop=["zzzz"],
        reasoning_effort="high",
        response_format={"type": "text"},
        user="u1",
        store=False,
        metadata={"k": "v"},
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert r.usage.completion_tokens == 4 and 13 not in []


def test_logprobs(demo):
    _, url = demo
    r = client(url).chat.completions.create(
        model="demo", messages=MSG, max_tokens=5, seed=2, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True) and item.logprob <= tops[0] + 1e-6


def test_prefix_cache_across_requests(demo):
    _, url = demo
    c = client(url)
    first = [{"role": "user", "content": "A long first question " + "about caches " * 40}]
    r1 = c.chat.completions.create(model="demo", messages=first, max_tokens=4, seed=0)
    convo = [*first, {"role": "assistant", "content": r1.choices[0].message.content}]
    convo.append({"role": "user", "content": "and a follow-up"})
    r2 = c.chat.completions.create(model="demo", messages=convo, max_tokens=4, seed=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens - 2  # only the new turn is prefilled


def test_completions_endpoint(demo):
    engine, url = demo
    r = client(url).completions.create(model="demo", prompt="Once upon", max_tokens=5, logprobs=2)
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(engine.encode("Once upon"))
    assert len(r.choices[0].logprobs.tokens) == 5
    ids = engine.encode("Once upon")
    r2 = client(url).completions.create(model="demo", prompt=ids, max_tokens=3)
    assert r2.usage.prompt_tokens == len(ids)


def test_reasoning_and_stop_strings(scripted, encoding):
    model, url = scripted
    reply = (
        "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Hello world. STOP here<|return|>"
    )
    script(model, encoding, reply, reply)
    c = client(url, key="none")
    r = c.chat.completions.create(model="scripted", messages=MSG, stop="STOP", temperature=0)
    msg = r.choices[0].message
    assert msg.content == "Hello world. " and r.choices[0].finish_reason == "stop"
    assert msg.model_extra["reasoning_content"] == "Let me think."  # never in content
    reasoning, content = "", ""
    for chunk in c.chat.completions.create(
        model="scripted", messages=MSG, stop=["STOP"], temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == ("Let me think.", "Hello world. ")


def test_tool_call_round_trip(scripted, encoding):
    model, url = scripted
    call = (
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    script(model, encoding, call, "<|channel|>final<|message|>Sunny.<|return|>", call)
    c = client(url, key="none")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert r.choices[0].finish_reason == "tool_calls"
    (tc,) = r.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {
        "city": "Paris"
    }
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "sunny"}'})
    r2 = c.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert r2.choices[0].message.content == "Sunny." and r2.choices[0].finish_reason == "stop"
    # streamed, the call arrives with its id, name and arguments
    calls, finish = [], None
    for chunk in c.chat.completions.create(
        model="scripted", messages=messages[:1], tools=[WEATHER], stream=True
    ):
        for ch in chunk.choices:
            calls += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and calls[0].function.name == "get_weather"


def _post(url, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=data, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "body, raw, status, needle",
    [
        (None, b"{not json", 400, "not valid JSON"),
        (None, b"[1]", 400, "JSON object"),
        ({"messages": MSG, "max_tokens": "many"}, None, 400, "max_tokens"),
        ({"messages": MSG, "temperature": 3}, None, 400, "temperature"),
        ({"messages": MSG, "top_p": 0}, None, 400, "top_p"),
        ({"messages": MSG, "n": 17}, None, 400, "n"),
        ({"messages": MSG, "reasoning": {"effort": "huge"}}, None, 400, "reasoning.effort"),
        (
            {"messages": MSG, "reasoning_effort": "low", "reasoning": {"effort": "high"}},
            None,
            400,
            "differ",
        ),
        ({"messages": MSG, "best_guess": 1}, None, 400, "unrecognized request argument"),
        ({"messages": [{"role": "robot", "content": "x"}]}, None, 400, "role"),
        ({"messages": []}, None, 400, "messages"),
        ({"messages": MSG, "model": "gpt-9"}, None, 404, "not served"),
        (
            {"messages": MSG, "response_format": {"type": "xml"}},
            None,
            400,
            "response_format",
        ),
        ({"messages": MSG, "tool_choice": "required"}, None, 400, "tool_choice"),
        ({"messages": MSG, "logit_bias": {"x": 1}}, None, 400, "logit_bias"),
        ({"messages": MSG, "stream_options": {"include_usage": True}}, None, 400, "stream"),
    ],
)
def test_bad_requests_get_openai_errors(demo, body, raw, status, needle):
    _, url = demo
    r = _post(url, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and {"type", "param", "code"} <= err.keys()


def test_auth_body_limit_context_and_health(demo, scripted):
    _, url = demo
    assert _post(url, {"messages": MSG}, key="wrong").status_code == 401
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    big = {"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}
    assert _post(url, big).status_code == 413
    _, surl = scripted
    long = {"messages": [{"role": "user", "content": "word " * 3000}]}
    r = httpx.post(surl + "/v1/chat/completions", json=long, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(url + "/nope").json()["error"]["type"] == "not_found_error"
    assert httpx.get(url + "/health").json()["status"] == "ok"  # still serving
    ok = client(url).chat.completions.create(model="demo", messages=MSG, max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_sixteen_concurrent_clients(demo):
    engine, url = demo

    def one(i):
        messages = [{"role": "user", "content": f"client {i}: " + "go " * i}]
        c = client(url)
        if i % 2:
            r = c.chat.completions.create(model="demo", messages=messages, max_tokens=8, seed=i)
            return i, r.usage.prompt_tokens, r.usage.completion_tokens, r.id
        n, rid = 0, None
        for chunk in c.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        ):
            rid = chunk.id
            if chunk.usage:
                return i, chunk.usage.prompt_tokens, chunk.usage.completion_tokens, rid
        return i, None, n, rid

    start = time.monotonic()
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert time.monotonic() - start < 240
    assert len({r[3] for r in results}) == 16  # distinct responses
    for i, prompt_tokens, completion_tokens, _ in results:
        # each answer is the answer to its own prompt (prompt lengths differ per client)
        messages = [{"role": "user", "content": f"client {i}: " + "go " * i}]
        assert prompt_tokens == len(engine.render(messages)) and completion_tokens == 8
    assert httpx.get(url + "/health").json()["queued"] == 0


def test_full_queue_503_and_disconnect_frees_the_engine():
    engine = mhc.load("demo")
    options = ServerOptions(model_name="demo", max_queue=1, max_batch=1)  # one at a time
    with ServerThread(engine, options) as url:
        long = {"model": "demo", "messages": MSG, "max_tokens": 32768, "stream": True}
        long["logit_bias"] = {"200002": -100, "200012": -100}  # no end token: runs until cut
        pool = cf.ThreadPoolExecutor(1)
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", url + "/v1/chat/completions", json=long) as running:
                lines = running.iter_lines()  # (kept: dropping it closes the stream)
                next(lines)  # generating now
                queued = pool.submit(
                    httpx.post,
                    url + "/v1/chat/completions",
                    json={"messages": MSG, "max_tokens": 2},
                    timeout=120,
                )
                deadline = time.monotonic() + 30
                while httpx.get(url + "/health").json()["queued"] < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                full = httpx.post(url + "/v1/chat/completions", json={"messages": MSG})
                assert full.status_code == 503 and full.headers["Retry-After"] == "1"
                assert full.json()["error"]["code"] == "queue_full"
            # the stream is closed (client gone): the long generation must stop
            assert queued.result(timeout=60).status_code == 200
        pool.shutdown()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["queued"]:
            assert time.monotonic() < deadline, "the engine was not freed"
            time.sleep(0.05)


def test_serve_command(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_harmony_core.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        c = client(f"http://127.0.0.1:{port}", key="k")
        r = c.chat.completions.create(model="demo", messages=MSG, max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{port}" in out and "Traceback" not in out
