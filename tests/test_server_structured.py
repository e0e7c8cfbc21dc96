"""The server's structured outputs: response_format on both endpoints, strict tools, the
reasoning budget, and 400s for constraints that cannot be enforced."""

import json

import httpx
import jsonschema
import pytest

openai = pytest.importorskip("openai")

import mlx_harmony_core as mhc  # noqa: E402
from mlx_harmony_core.server import ServerOptions  # noqa: E402
from mlx_harmony_core.testing import ServerThread  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}},
            "required": ["id"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def url():
    engine = mhc.load("demo", prefix_cache_entries=8)
    with ServerThread(engine, ServerOptions(model_name="demo", max_batch=4)) as base:
        yield base


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat(url, stream=False, **body):
    body = {"model": "demo", "messages": [{"role": "user", "content": "who?"}], **body}
    extra = {k: body.pop(k) for k in ("max_reasoning_tokens",) if k in body}
    c = _client(url)
    if not stream:
        r = c.chat.completions.create(**body, extra_body=extra)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in c.chat.completions.create(**body, stream=True, extra_body=extra):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


def test_json_schema_streaming_and_not(url):
    for seed in range(6):
        kw = dict(response_format=FORMAT, temperature=1.0, seed=seed, max_tokens=80)
        text, finish = _chat(url, max_reasoning_tokens=0, **kw)
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
        assert _chat(url, stream=True, max_reasoning_tokens=0, **kw) == (text, finish)


def test_json_object_after_a_reasoning_budget(url):
    text, finish = _chat(
        url,
        response_format={"type": "json_object"},
        max_reasoning_tokens=5,
        temperature=1.0,
        seed=4,
        max_tokens=120,
    )
    if finish == "stop":
        assert isinstance(json.loads(text), dict)


def test_strict_tool_calls(url):
    c = _client(url)
    for seed in range(5):
        r = c.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "look it up"}],
            tools=[TOOL],
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=40,
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        for call in ch.message.tool_calls:
            args = json.loads(call.function.arguments)
            jsonschema.validate(args, TOOL["function"]["parameters"])


def test_completions_take_response_format(url):
    r = httpx.post(
        url + "/v1/completions",
        json={
            "model": "demo",
            "prompt": "JSON:",
            "max_tokens": 80,
            "temperature": 1.0,
            "seed": 2,
            "response_format": FORMAT,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), SCHEMA)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"response_format": {"type": "xml"}}, "response_format", "not one of"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 3}},
                }
            },
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "string", "pattern": "(?<=a)b"},
                    },
                }
            },
            "response_format",
            "cannot be enforced",
        ),
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens", None),
    ],
)
def test_bad_constraints_are_400s(url, body, param, words):
    payload = {"model": "demo", "messages": [{"role": "user", "content": "x"}], **body}
    r = httpx.post(url + "/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    if words:
        assert words in err["message"]
