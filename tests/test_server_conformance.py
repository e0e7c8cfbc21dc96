"""Chat and text completions against OpenAI's published schema (issue 29, items 3 and 4):
every body and streamed chunk validated; the answer's logprobs per delta; reasoning under
both names; streamed tool-call arguments; ``n`` > 1; the shutdown's error item; bad input
(deep schemas, lone surrogates) answered 400."""

import json
from pathlib import Path

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")

import mlx_harmony_core as mhc  # noqa: E402
from mlx_harmony_core.request import Completion, StreamEvent, Timings, Usage  # noqa: E402
from mlx_harmony_core.server import ServerOptions  # noqa: E402
from mlx_harmony_core.server.choices import Choice  # noqa: E402
from mlx_harmony_core.server.protocol import APIError, ChatRequest  # noqa: E402
from mlx_harmony_core.server.writers import ChatWriter  # noqa: E402
from mlx_harmony_core.testing import ScriptedModel, ServerThread  # noqa: E402

# OpenAI's schemas, vendored (source and commit in the file).
SCHEMAS = json.loads(
    (Path(__file__).parent / "schemas" / "openai_chat_completions.json").read_text()
)
MSG = [{"role": "user", "content": "Hello"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
REPLY = (
    "<|channel|>analysis<|message|>Let me think about it.<|end|><|start|>assistant"
    "<|channel|>final<|message|>The answer is 4 — café ☕ 日本語.<|return|>"
)
CALL = (
    "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant"
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}'
    "<|call|>"
)


def validator(name):
    cls = jsonschema.validators.validator_for(
        {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    )
    return cls({**SCHEMAS, "$ref": f"#/components/schemas/{name}"})


CHAT, CHUNK, TEXT = (
    validator("CreateChatCompletionResponse"),
    validator("CreateChatCompletionStreamResponse"),
    validator("CreateCompletionResponse"),
)


def check(v, item):
    errors = sorted(v.iter_errors(item), key=str)
    assert not errors, (errors[0].message, list(errors[0].absolute_path), item)


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=120)


def stream(url, path, body):
    """The stream's items (JSON), the [DONE] checked."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@pytest.fixture(scope="module")
def demo():
    engine = mhc.load("demo")
    with ServerThread(engine, ServerOptions(model_name="demo")) as url:
        yield engine, url


@pytest.fixture(scope="module")
def scripted(encoding):
    model = ScriptedModel(replies=[[]])
    engine = mhc.Engine(model, encoding=encoding, context_length=2048)
    with ServerThread(engine, ServerOptions(model_name="scripted")) as url:
        yield model, engine, url


def script(model, encoding, *replies):
    model.replies = [list(encoding.encode(r, allowed_special="all")) for r in replies]
    model.requests = 0


def token_text(engine, entries):
    """The text of logprob entries' bytes, concatenated."""
    return b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8")


def test_demo_chat_bodies_and_chunks_match_openai_schema(demo):
    _, url = demo
    body = {"messages": MSG, "max_tokens": 8, "seed": 3, "logprobs": True, "top_logprobs": 2}
    for extra in ({}, {"n": 2}, {"tools": [WEATHER]}):
        r = post(url, "/v1/chat/completions", {**body, **extra})
        assert r.status_code == 200, r.text
        check(CHAT, r.json())
    out = r.json()
    assert out["choices"][0]["message"]["refusal"] is None
    assert out["choices"][0]["logprobs"]["refusal"] is None
    assert "reasoning_tokens" in out["usage"]["completion_tokens_details"]
    items = stream(
        url, "/v1/chat/completions", {**body, "n": 2, "stream_options": {"include_usage": True}}
    )
    for item in items:
        check(CHUNK, item)
    assert all(item["usage"] is None for item in items[:-1]) and items[-1]["choices"] == []
    assert {c["index"] for item in items for c in item["choices"]} == {0, 1}
    assert items[-1]["usage"]["completion_tokens"] == 16  # both choices, the prompt once


def test_demo_text_completions_match_openai_schema(demo):
    _, url = demo
    body = {"prompt": "Once upon", "max_tokens": 6, "logprobs": 2, "seed": 1}
    for extra in ({}, {"n": 2}):
        r = post(url, "/v1/completions", {**body, **extra})
        assert r.status_code == 200, r.text
        check(TEXT, r.json())
    a, b = r.json()["choices"]
    assert (a["index"], b["index"]) == (0, 1)
    items = stream(
        url, "/v1/completions", {**body, "n": 2, "stream_options": {"include_usage": True}}
    )
    for item in items:
        # The schema is the body's (OpenAI: "streamed and non-streamed share the same
        # shape"), yet OpenAI's own streams send finish_reason null until the last chunk of
        # a choice, as clients expect: only that is let through.
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in item["choices"]]
        check(TEXT, {**item, "choices": choices})
    for i in (0, 1):  # each chunk's logprobs are its own text's tokens
        chunks = [c for item in items for c in item["choices"] if c["index"] == i and c["text"]]
        assert chunks and all(c["logprobs"]["tokens"] for c in chunks)
        assert chunks[1]["logprobs"]["text_offset"][0] == len(chunks[0]["text"])
    assert items[-1]["usage"]["completion_tokens"] == 12


def test_chat_logprobs_are_the_contents_delta_by_delta(scripted, encoding):
    model, engine, url = scripted
    body = {"messages": MSG, "max_tokens": 200, "logprobs": True, "top_logprobs": 1}
    script(model, encoding, REPLY)
    out = post(url, "/v1/chat/completions", body).json()
    check(CHAT, out)
    choice = out["choices"][0]
    message = choice["message"]
    assert message["content"] == "The answer is 4 — café ☕ 日本語."
    assert message["reasoning"] == message["reasoning_content"] == "Let me think about it."
    assert token_text(engine, choice["logprobs"]["content"]) == message["content"]
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    script(model, encoding, REPLY)
    items = stream(url, "/v1/chat/completions", body)
    content, reasoning = [], []
    for item in items:
        check(CHUNK, item)
        for c in item["choices"]:
            delta = c["delta"]
            if delta.get("content"):
                # Each delta carries exactly its own tokens: their bytes are its text.
                assert token_text(engine, c["logprobs"]["content"]) == delta["content"]
                content.append(delta["content"])
            if "reasoning" in delta:
                assert delta["reasoning"] == delta["reasoning_content"] and c["logprobs"] is None
                reasoning.append(delta["reasoning"])
    assert "".join(content) == message["content"] and "".join(reasoning) == message["reasoning"]


def test_tool_call_arguments_stream_as_deltas(scripted, encoding):
    model, _, url = scripted
    body = {"messages": MSG, "max_tokens": 200, "tools": [WEATHER]}
    script(model, encoding, CALL)
    items = stream(url, "/v1/chat/completions", body)
    calls = []
    for item in items:
        check(CHUNK, item)
        for c in item["choices"]:
            calls += c["delta"].get("tool_calls") or []
    assert len(calls) > 3  # the arguments arrive piece by piece
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in c and c["index"] == 0 for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Oslo"}
    assert items[-1]["choices"][0]["finish_reason"] == "tool_calls"
    script(model, encoding, CALL)
    out = post(url, "/v1/chat/completions", body).json()
    check(CHAT, out)
    assert (
        out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    )


def test_n_choices_are_rows_with_seeds(scripted, encoding):
    model, _, url = scripted
    script(model, encoding, REPLY, REPLY)
    body = {"messages": MSG, "max_tokens": 200, "n": 2, "seed": 5, "reasoning": {"effort": "low"}}
    out = post(url, "/v1/chat/completions", body).json()
    check(CHAT, out)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(c["message"]["content"].startswith("The answer") for c in out["choices"])
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_shutdown_ends_a_stream_with_an_error_and_a_body_with_503():
    class Client:
        def token_bytes(self):
            return [b"x"] * 10

    req = ChatRequest.model_validate({"messages": MSG, "stream": True})
    done = Completion("", "", [], "cancelled", Usage(3, 1), Timings())
    writer = ChatWriter(req, ServerOptions(model_name="m"), Client())
    items = writer.chunks(Choice(0, StreamEvent(finish_reason="cancelled", completion=done)))
    assert items == [
        {
            "error": {
                "message": "the server is shutting down",
                "type": "server_error",
                "code": "shutting_down",
            }
        }
    ]
    assert writer.chunks(Choice(0, StreamEvent(delta="late"))) == []
    req = ChatRequest.model_validate({"messages": MSG})
    writer = ChatWriter(req, ServerOptions(model_name="m"), Client())
    writer.add(Choice(0, StreamEvent(finish_reason="cancelled", completion=done)))
    with pytest.raises(APIError) as info:
        writer.body()
    assert info.value.status == 503 and info.value.code == "shutting_down"


def nested(levels):
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("levels", [100, 300])
def test_deep_schemas_are_400s_naming_the_param(scripted, levels):
    _, _, url = scripted
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(levels)}}
    r = post(url, "/v1/chat/completions", {"messages": MSG, "tools": [tool]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tools[0].function.parameters" and "levels deep" in err["message"]
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(levels)}}
    r = post(url, "/v1/chat/completions", {"messages": MSG, "response_format": rf})
    assert r.status_code == 400 and "levels deep" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"tools": [{**WEATHER, "function": {**WEATHER["function"], "description": "\ud800"}}]},
            "tools[0].function.description",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]},
            "messages[0].content[0].text",
        ),
        ({"messages": [{"role": "system", "content": "\ud834"}, *MSG]}, "messages[0].content"),
    ],
)
def test_lone_surrogates_are_400s_naming_the_param(scripted, body, param):
    _, _, url = scripted
    data = json.dumps({"messages": MSG, **body})  # ensure_ascii: "\\ud800", valid JSON
    r = httpx.post(
        url + "/v1/chat/completions",
        content=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"], err
