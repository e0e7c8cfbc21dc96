"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes), demo model."""

import httpx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.testing import ServerThread

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def served():
    engine = mhc.load("demo")
    opts = ServerOptions(model_name="demo", api_key=KEY, metrics=False)
    with ServerThread(engine, opts) as url:
        yield engine, url


def post(url: str, path: str, body: object, headers: dict = AUTH) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def test_tokenize_prompt_and_messages(served):
    engine, url = served
    r = post(url, "/tokenize", {"prompt": "Hello world", "model": "demo"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == engine.encode("Hello world")
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.context_length
    r = post(url, "/tokenize", {"prompt": "Hello", "add_special_tokens": False})
    assert r.json()["tokens"] == engine.chat_format.encode_text("Hello")
    r = post(url, "/tokenize", {"messages": MSG, "add_generation_prompt": True})
    assert r.json()["tokens"] == engine.render(MSG)
    r = post(url, "/tokenize", {"messages": MSG, "reasoning_effort": "high"})
    assert r.json()["tokens"] == engine.render(MSG, reasoning_effort="high")
    assert r.json()["tokens"] != engine.render(MSG, reasoning_effort="low")


def test_detokenize_round_trip(served):
    engine, url = served
    ids = engine.encode("Grüße, world")
    r = post(url, "/detokenize", {"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "Grüße, world"}
    assert post(url, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/detokenize", {"tokens": [10**9]}, "outside this model's vocabulary"),
        ("/detokenize", {"tokens": [-1]}, "outside this model's vocabulary"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
        ("/detokenize", {"tokens": [1.5]}, "tokens.0"),
        ("/detokenize", {"tokens": [True]}, "tokens.0"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {}, "one of prompt or messages"),
        ("/tokenize", {"prompt": "a", "messages": MSG}, "one of prompt or messages"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": MSG, "add_generation_prompt": False}, "add_generation_prompt"),
        ("/tokenize", {"prompt": "a", "bogus": 1}, "unrecognized request argument: bogus"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
        ("/tokenize", [1, 2], "JSON object"),
    ],
)
def test_bad_bodies_are_openai_400s(served, path, body, needle):
    _, url = served
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"] + str(
        err.get("param")
    )


def test_model_and_key_are_checked(served):
    _, url = served
    assert post(url, "/tokenize", {"prompt": "a", "model": "other"}).status_code == 404
    assert post(url, "/tokenize", {"prompt": "a"}, headers={}).status_code == 401
    assert post(url, "/detokenize", {"tokens": [1]}, headers={}).status_code == 401
