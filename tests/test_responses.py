"""``/v1/responses``: OpenAI's Responses API, driven by the real ``openai`` client and the
OpenAI Agents SDK against the server; every response and stream event is validated against
OpenAI's schema (``tests/schemas/openai_responses.json``, vendored from openai-openapi)."""

import json
import sqlite3
from pathlib import Path

import httpx
import jsonschema
import pytest

openai = pytest.importorskip("openai")

import mlx_harmony_core as mhc  # noqa: E402
from mlx_harmony_core.harmony import render_prompt  # noqa: E402
from mlx_harmony_core.server import ServerOptions  # noqa: E402
from mlx_harmony_core.server.items import (  # noqa: E402
    ReasoningSealer,
    normalize_input,
    to_messages,
)
from mlx_harmony_core.server.store import ResponseStore, StoreError  # noqa: E402
from mlx_harmony_core.testing import ScriptedModel, ServerThread  # noqa: E402

SPEC = json.loads((Path(__file__).parent / "schemas" / "openai_responses.json").read_text())
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
}
_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def check(instance, name):
    """``instance`` is valid under OpenAI's schema ``name``."""
    if name not in _VALIDATORS:
        root = {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
        _VALIDATORS[name] = jsonschema.Draft202012Validator(root)
    errors = sorted(_VALIDATORS[name].iter_errors(instance), key=lambda e: e.path)
    assert not errors, f"{name}: " + "; ".join(f"{e.message} at {list(e.path)}" for e in errors)


TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CALL = (
    "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>"
    'commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
)
FINAL = (
    "<|channel|>analysis<|message|>It is sunny.<|end|><|start|>assistant<|channel|>final"
    "<|message|>Sunny in Paris.<|return|>"
)


@pytest.fixture(scope="module")
def scripted(encoding, tmp_path_factory):
    model = ScriptedModel(replies=[[]])
    engine = mhc.Engine(model, encoding=encoding, context_length=4096)
    db = tmp_path_factory.mktemp("responses") / "responses.db"
    options = ServerOptions(model_name="scripted", responses_db=str(db))
    with ServerThread(engine, options) as url:
        yield model, url, db


def script(model, encoding, *replies):
    model.replies = [list(encoding.encode(r, allowed_special="all")) for r in replies]
    model.requests = 0


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def sse(url, body):
    """The raw typed events of a streamed request."""
    events = []
    with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                events.append(event)
    return events


def post(url, body):
    return httpx.post(url + "/v1/responses", json=body, timeout=120)


def rows(db):
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def strip_ids(value):
    """``value`` without ids and times (which differ between two runs)."""
    if isinstance(value, dict):
        return {
            k: strip_ids(v)
            for k, v in value.items()
            if k not in ("id", "call_id", "created_at", "completed_at", "item_id")
        }
    if isinstance(value, list):
        return [strip_ids(v) for v in value]
    return value


# -- a scripted tool turn: exact items and events -----------------------------------------------


def test_tool_turn_exact_events_and_items(scripted, encoding):
    model, url, _ = scripted
    script(model, encoding, CALL)
    body = {"model": "scripted", "input": "Weather in Paris?", "tools": [TOOL]}
    events = sse(url, body)
    for i, e in enumerate(events):
        assert e["sequence_number"] == i
        check(e, EVENT_SCHEMAS[e["type"]])
    types = [e["type"] for e in events]
    reasoning = ["response.reasoning_text.delta"] * types.count("response.reasoning_text.delta")
    args = ["response.function_call_arguments.delta"] * types.count(
        "response.function_call_arguments.delta"
    )
    assert len(reasoning) >= 3 and len(args) >= 3  # both stream as they decode
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *reasoning,
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        *args,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]["response"]
    check(final, "Response")
    assert [o["type"] for o in final["output"]] == ["reasoning", "function_call"]
    assert final["output"][0]["content"] == [
        {"type": "reasoning_text", "text": "Need the weather."}
    ]
    call = final["output"][1]
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city": "Paris"}')
    deltas = "".join(e["delta"] for e in events if e["type"].endswith("arguments.delta"))
    assert deltas == call["arguments"]
    assert events[-2]["item"] == call
    assert [e["output_index"] for e in events if "output_index" in e][-1] == 1
    u = final["usage"]
    assert u["output_tokens_details"]["reasoning_tokens"] == len(
        encoding.encode("Need the weather.")
    )
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    # The same request, not streamed, ends with the same response.
    script(model, encoding, CALL)
    body = post(url, body).json()
    check(body, "Response")
    assert strip_ids(body) == strip_ids(final)
    # ... and the openai client's stream accumulator builds it too.
    script(model, encoding, CALL)
    with client(url).responses.stream(
        model="scripted", input="Weather in Paris?", tools=[TOOL]
    ) as stream:
        kinds = [e.type for e in stream]
        acc = stream.get_final_response()
    assert kinds == types
    keys = ("type", "content", "name", "arguments", "status", "summary")
    got = [{k: v for k, v in o.items() if k in keys} for o in acc.model_dump()["output"]]
    want = [{k: v for k, v in o.items() if k in keys} for o in final["output"]]
    assert got == want and acc.status == "completed" and acc.usage.total_tokens > 0


def test_continuation_equals_whole_history_and_store(scripted, encoding):
    model, url, db = scripted
    c = client(url)
    script(model, encoding, CALL, FINAL, FINAL)
    first = c.responses.create(model="scripted", input="Weather in Paris?", tools=[TOOL])
    call = first.output[-1]
    assert call.type == "function_call"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    events = sse(url, {"previous_response_id": first.id, "input": [output], "tools": [TOOL]})
    for e in events:
        check(e, EVENT_SCHEMAS[e["type"]])
    cont = events[-1]["response"]
    assert [o["type"] for o in cont["output"]] == ["reasoning", "message"]
    assert cont["output"][1]["content"][0]["text"] == "Sunny in Paris."
    assert cont["previous_response_id"] == first.id
    # The whole history sent again gives the same answer.
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        *[o.model_dump(exclude_none=True) for o in first.output],
        output,
    ]
    whole = c.responses.create(model="scripted", input=history, tools=[TOOL], store=False)
    assert strip_ids(whole.model_dump(exclude_none=True)["output"]) == strip_ids(cont["output"])
    # Stored: retrieve, list input items (pagination), delete.
    got = c.responses.retrieve(cont["id"])
    check(httpx.get(f"{url}/v1/responses/{cont['id']}").json(), "Response")
    assert got.output_text == "Sunny in Paris."
    items = c.responses.input_items.list(first.id)
    check(httpx.get(f"{url}/v1/responses/{first.id}/input_items").json(), "ResponseItemList")
    assert [i.type for i in items.data] == ["message"]
    three = [{"role": "user", "content": f"m{i}"} for i in range(3)]
    script(model, encoding, FINAL)
    r3 = c.responses.create(model="scripted", input=three)
    page = c.responses.input_items.list(r3.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["m0", "m1"] and page.has_more
    rest = c.responses.input_items.list(r3.id, limit=2, order="asc", after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["m2"] and not rest.has_more
    desc = c.responses.input_items.list(r3.id)
    assert [i.content[0].text for i in desc.data] == ["m2", "m1", "m0"]
    all_ids = [i.id for i in c.responses.input_items.list(r3.id, order="asc", limit=1)]
    assert len(all_ids) == 3
    n = rows(db)
    c.responses.delete(first.id)
    assert rows(db) == n - 1
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.create(model="scripted", previous_response_id=first.id, input="hi")
    assert err.value.body["param"] == "previous_response_id"
    # A continuation of the continuation still has its history (one row holds it).
    script(model, encoding, FINAL)
    again = c.responses.create(previous_response_id=cont["id"], input="Tomorrow?", tools=[TOOL])
    assert again.status == "completed" and again.usage.input_tokens > cont["usage"]["input_tokens"]


def test_store_survives_a_restart(scripted, encoding, tmp_path):
    model, url, db = scripted
    c = client(url)
    script(model, encoding, FINAL)
    first = c.responses.create(model="scripted", input="Hi")
    store = ResponseStore(db)  # another process's view: committed, readable
    assert store.get(first.id)["output"][-1]["content"][0]["text"] == "Sunny in Paris."
    assert [i["type"] for i in store.conversation(first.id)] == ["message", "reasoning", "message"]
    store.close()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_corrupt_or_foreign_database_is_a_startup_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable responses database"):
        ResponseStore(junk)
    assert junk.read_bytes() == b"not a database at all" * 100
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE t (x)")
    before = foreign.read_bytes()
    with pytest.raises(StoreError, match="something else"):
        ResponseStore(foreign)
    assert foreign.read_bytes() == before
    with pytest.raises(StoreError):
        mhc.server.create_app(
            mhc.Engine(ScriptedModel(), encoding=mhc.load_encoding(), context_length=64),
            ServerOptions(responses_db=str(foreign)),
        )


def test_no_store_flag(encoding, tmp_path):
    model = ScriptedModel(replies=[[]])
    engine = mhc.Engine(model, encoding=encoding, context_length=2048)
    db = tmp_path / "never.db"
    with ServerThread(engine, ServerOptions(store=False, responses_db=str(db))) as url:
        script(model, encoding, FINAL)
        r = post(url, {"input": "hi"}).json()
        assert r["store"] is False
        assert httpx.get(f"{url}/v1/responses/{r['id']}").status_code == 404
        bad = post(url, {"input": "hi", "previous_response_id": r["id"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "previous_response_id"
    assert not db.exists()


def test_encrypted_reasoning_round_trip(scripted, encoding):
    model, url, db = scripted
    n = rows(db)
    script(model, encoding, CALL, FINAL)
    body = {
        "input": "Weather in Paris?",
        "tools": [TOOL],
        "store": False,
        "include": ["reasoning.encrypted_content"],
    }
    first = post(url, body).json()
    check(first, "Response")
    reasoning, call = first["output"]
    blob = reasoning["encrypted_content"]
    assert "weather" not in blob and len(blob) > 40
    sent = {"type": "reasoning", "id": reasoning["id"], "summary": [], "encrypted_content": blob}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        sent,
        call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"},
    ]
    second = post(url, {**body, "input": history})
    assert second.status_code == 200, second.text
    # The restored reasoning is in the prompt: the same history without it is shorter.
    without = post(url, {**body, "input": [history[0], *history[2:]]})
    delta = second.json()["usage"]["input_tokens"] - without.json()["usage"]["input_tokens"]
    assert delta >= len(encoding.encode("Need the weather."))
    assert rows(db) == n  # store: false
    forged = blob[:-6] + ("AAAAAA" if not blob.endswith("AAAAAA") else "BBBBBB")
    for fake in (forged, "bm90IG91cnM=", "!!!"):
        history[1] = {**sent, "encrypted_content": fake}
        r = post(url, {**body, "input": history})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "input[1].encrypted_content"
    other = ReasoningSealer(b"k" * 32).seal("Need the weather.")
    history[1] = {**sent, "encrypted_content": other}
    assert post(url, {**body, "input": history}).status_code == 400


def test_reasoning_kept_across_tool_calls_dropped_after_final(encoding):
    items = normalize_input(
        [
            {"role": "user", "content": "Q1"},
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "R1"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "A1"}],
            },
            {"role": "user", "content": "Q2"},
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "R2"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "out"},
        ],
        None,
    )
    text = encoding.decode(render_prompt(to_messages(items, "Be brief.")))
    assert "R1" not in text  # an earlier turn ended with a final answer
    assert "R2" in text and "out" in text and "Be brief." in text
    assert "A1" in text and "to=functions.f" in text


def test_incomplete_logprobs_and_text_format(scripted, encoding):
    model, url, _ = scripted
    script(model, encoding, FINAL)
    r = post(url, {"input": "hi", "max_output_tokens": 4}).json()
    check(r, "Response")
    assert r["status"] == "incomplete"
    assert r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["output"][-1]["status"] == "incomplete"
    events = None
    script(model, encoding, FINAL)
    events = sse(url, {"input": "hi", "max_output_tokens": 4})
    assert events[-1]["type"] == "response.incomplete"
    check(events[-1], "ResponseIncompleteEvent")
    script(model, encoding, FINAL)
    body = {"input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    r = post(url, body).json()
    check(r, "Response")
    lps = r["output"][-1]["content"][0]["logprobs"]
    assert "".join(lp["token"] for lp in lps) == "Sunny in Paris."
    assert all(len(lp["top_logprobs"]) == 2 for lp in lps)
    script(model, encoding, FINAL)
    events = sse(url, body)
    for e in events:
        check(e, EVENT_SCHEMAS[e["type"]])
    streamed = [
        lp["token"]
        for e in events
        if e["type"] == "response.output_text.delta"
        for lp in e["logprobs"]
    ]
    assert "".join(streamed) == "Sunny in Paris."
    assert events[-1]["response"]["output"][-1]["content"][0]["logprobs"] == lps
    answer = '{"city": "Paris"}'
    script(
        model,
        encoding,
        f"<|channel|>analysis<|message|>ok<|end|><|start|>assistant<|channel|>final<|message|>{answer}<|return|>",
    )
    fmt = {
        "format": {
            "type": "json_schema",
            "name": "place",
            "schema": TOOL["parameters"],
            "strict": True,
        }
    }
    r = client(url).responses.create(model="scripted", input="where?", text=fmt)
    assert json.loads(r.output_text) == {"city": "Paris"}
    assert r.text.format.type == "json_schema"


BAD = [
    ({"input": [{"type": "message", "role": "user", "content": 3}]}, "input[0].content"),
    ({"input": [{"type": "mystery"}]}, "input[0].type"),
    ({"input": [7]}, "input[0]"),
    ({"input": [{"type": "message", "role": "robot", "content": "x"}]}, "input[0].role"),
    (
        {"input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]},
        "input[0].content[0].type",
    ),
    (
        {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
        "input[0].call_id",
    ),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "reasoning", "content": [{"type": "bogus"}]}]}, "input[0].content[0]"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0]"),
    ({"input": "hi", "tools": [TOOL, TOOL]}, "tools[1].name"),
    (
        {"input": "hi", "tools": [{**TOOL, "parameters": {"type": "nonsense"}}]},
        "tools[0]",
    ),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    (
        {"input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "x"}},
        "tool_choice",
    ),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "hi", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"input": "hi", "include": ["everything"]}, "include"),
    ({"input": "hi", "temperature": 5}, "temperature"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 10**9}, "max_output_tokens"),
    ({"input": "hi", "surprise": 1}, "surprise"),
    ({"input": "hi", "metadata": {"k": 1}}, "metadata.k"),
    ({"input": "hi", "background": True}, "background"),
    ({}, "input"),
    ({"input": "hi", "model": "other"}, "model"),
    ({"input": [{"type": "message", "role": "user", "content": "x"}] * 5000}, "input"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_parameter(scripted, body, param):
    _, url, db = scripted
    n = rows(db)
    for stream in (False, True):
        r = post(url, {**body, "stream": stream})
        assert r.status_code in (400, 404), r.text
        err = r.json()["error"]
        assert err["param"] == param, err
        assert err["type"] == "invalid_request_error" and err["message"]
    assert rows(db) == n


def test_unknown_ids_are_404s(scripted):
    _, url, _ = scripted
    for method, path in (
        ("GET", "/v1/responses/resp_nope"),
        ("DELETE", "/v1/responses/resp_nope"),
        ("GET", "/v1/responses/resp_nope/input_items"),
    ):
        r = httpx.request(method, url + path)
        assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"
    r = post(url, {"previous_response_id": "resp_nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_openapi_describes_the_endpoints(scripted):
    _, url, _ = scripted
    spec = httpx.get(url + "/openapi.json").json()
    assert {"post"} <= set(spec["paths"]["/v1/responses"])
    assert {"get", "delete"} <= set(spec["paths"]["/v1/responses/{response_id}"])
    assert "get" in spec["paths"]["/v1/responses/{response_id}/input_items"]
    assert "ResponsesRequest" in spec["components"]["schemas"]


# -- the OpenAI Agents SDK ----------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
@pytest.mark.parametrize("kind", ["responses", "chat_completions"])
def test_agents_sdk_function_tool(scripted, encoding, kind, streamed):
    agents = pytest.importorskip("agents")
    model, url, _ = scripted
    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        seen.append(city)
        return "sunny"

    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    cls = agents.OpenAIResponsesModel if kind == "responses" else agents.OpenAIChatCompletionsModel
    agent = agents.Agent(
        name="weather",
        instructions="Answer about the weather.",
        tools=[get_weather],
        model=cls(model="scripted", openai_client=aclient),
    )
    script(model, encoding, CALL, FINAL)
    if streamed:
        import asyncio

        async def run():
            result = agents.Runner.run_streamed(agent, "Weather in Paris?")
            async for _ in result.stream_events():
                pass
            return result

        result = asyncio.run(run())
    else:
        result = agents.Runner.run_sync(agent, "Weather in Paris?")
    assert seen == ["Paris"]
    assert result.final_output == "Sunny in Paris."
    kinds = [type(i).__name__ for i in result.new_items]
    order = [k for k in kinds if k in ("ToolCallItem", "ToolCallOutputItem", "MessageOutputItem")]
    assert order == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"], kinds


# -- the demo model: sampling and the prefix cache ----------------------------------------------

STRICT = {
    "type": "function",
    "name": "lookup",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"q": {"type": "string", "maxLength": 8}},
        "required": ["q"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    engine = mhc.load("demo", prefix_cache_entries=8)
    db = tmp_path_factory.mktemp("demo-responses") / "responses.db"
    with ServerThread(engine, ServerOptions(model_name="demo", responses_db=str(db))) as url:
        yield url


def test_stream_equals_body_for_the_same_seed(demo):
    body = {"input": "Hello", "max_output_tokens": 12, "temperature": 1.0, "seed": 7}
    whole = post(demo, body).json()
    events = sse(demo, body)
    for e in events:
        check(e, EVENT_SCHEMAS[e["type"]])
    streamed = events[-1]["response"]
    assert strip_ids(streamed["output"]) == strip_ids(whole["output"])
    assert streamed["usage"]["output_tokens"] == whole["usage"]["output_tokens"] == 12
    assert streamed["status"] == whole["status"] == "incomplete"


def test_continuation_prefills_only_the_new_input(demo):
    """A tool-call continuation extends the previous request's exact tokens: the prefix
    cache holds its prompt and reply, only the tool output is prefilled."""
    first = post(demo, {"input": "Find it", "tools": [STRICT], "tool_choice": "required"})
    first = first.json()
    call = first["output"][-1]
    assert call["type"] == "function_call" and json.loads(call["arguments"])["q"] is not None
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "found"}
    body = {"previous_response_id": first["id"], "input": [output], "tools": [STRICT]}
    cont = post(demo, {**body, "max_output_tokens": 2}).json()
    before = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    cached = cont["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached == before
    new = cont["usage"]["input_tokens"] - cached
    assert 0 < new <= 20  # the tool message and the next assistant header


def test_concurrent_requests_and_a_crash_mid_write(scripted, encoding, tmp_path):
    import concurrent.futures as cf
    import subprocess
    import sys

    model, url, db = scripted
    script(model, encoding, FINAL)
    n = rows(db)
    with cf.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: post(url, {"input": f"q{i}"}).json()["id"], range(8)))
    assert rows(db) == n + 8 and len(set(ids)) == 8
    # A process that dies inside its transaction leaves the last committed state.
    crash = tmp_path / "crash.db"
    ResponseStore(crash).close()
    code = (
        f"import os, sqlite3; db = sqlite3.connect({str(crash)!r}, isolation_level=None);"
        "db.execute('BEGIN IMMEDIATE');"
        "db.execute(\"INSERT INTO responses VALUES ('resp_x', 0, '{}', '[]', '[]', NULL)\");"
        "os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    store = ResponseStore(crash)
    assert store.get("resp_x") is None
    store.close()


# -- custom tools: free text, or text under a Lark / regex grammar ------------------------------

CODE = {"type": "custom", "name": "run_code", "description": "Runs Python."}
CUSTOM_CALL = (
    "<|channel|>analysis<|message|>Run it.<|end|><|start|>assistant<|channel|>"
    "commentary to=functions.run_code <|message|>print(1 + 1)<|call|>"
)


def test_custom_tool_free_text(scripted, encoding):
    model, url, _ = scripted
    script(model, encoding, CUSTOM_CALL, FINAL)
    events = sse(url, {"input": "Compute 1 + 1", "tools": [CODE]})
    for e in events:
        check(e, EVENT_SCHEMAS.get(e["type"]) or _custom_event(e["type"]))
    types = [e["type"] for e in events]
    assert "response.custom_tool_call_input.delta" in types
    assert types[-3:] == [
        "response.custom_tool_call_input.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]["response"]
    check(final, "Response")
    call = final["output"][-1]
    assert (call["type"], call["name"], call["input"]) == (
        "custom_tool_call",
        "run_code",
        "print(1 + 1)",
    )
    assert final["tools"] == [{**CODE, "format": {"type": "text"}}]
    out = {"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "2"}
    cont = post(url, {"previous_response_id": final["id"], "input": [out], "tools": [CODE]})
    assert cont.status_code == 200 and cont.json()["output"][-1]["type"] == "message"
    # A custom output must answer a custom call.
    wrong = {**out, "type": "function_call_output"}
    r = post(url, {"previous_response_id": final["id"], "input": [wrong], "tools": [CODE]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].call_id"


def _custom_event(kind):
    return {
        "response.custom_tool_call_input.delta": "ResponseCustomToolCallInputDeltaEvent",
        "response.custom_tool_call_input.done": "ResponseCustomToolCallInputDoneEvent",
    }[kind]


@pytest.mark.parametrize(
    ("fmt", "pattern"),
    [
        (
            {"type": "grammar", "syntax": "regex", "definition": "[0-9]{3}-[a-z]{2}"},
            r"[0-9]{3}-[a-z]{2}",
        ),
        (
            {
                "type": "grammar",
                "syntax": "lark",
                "definition": 'start: "GO " DIGIT DIGIT\nDIGIT: /[0-9]/',
            },
            r"GO [0-9]{2}",
        ),
    ],
    ids=["regex", "lark"],
)
def test_custom_tool_grammar_is_enforced(demo, fmt, pattern):
    import re

    tool = {"type": "custom", "name": "code", "format": fmt}
    body = {"input": "Go", "tools": [tool], "tool_choice": "required", "seed": 3}
    r = post(demo, body).json()
    check(r, "Response")
    call = r["output"][-1]
    assert call["type"] == "custom_tool_call", r["output"]
    assert re.fullmatch(pattern, call["input"]), call["input"]


def test_custom_tool_bad_formats(scripted):
    _, url, _ = scripted
    for fmt, param in (
        ({"type": "grammar", "syntax": "ebnf", "definition": "x"}, "tools[0].format.syntax"),
        ({"type": "grammar", "syntax": "lark", "definition": ""}, "tools[0].format.definition"),
        ({"type": "json"}, "tools[0].format"),
        ({"type": "grammar", "syntax": "lark", "definition": "start: ("}, "tools"),
    ):
        r = post(url, {"input": "x", "tools": [{"type": "custom", "name": "c", "format": fmt}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


class FailingClient:
    """An ``EngineClient`` double whose generation fails after two answer deltas."""

    context_length = 64
    pending = 0

    def request(self, prompt, params, **options):
        return prompt

    def encode(self, text):
        return [ord(c) for c in text]

    def token_bytes(self):
        return [bytes([i]) for i in range(256)]

    def submit(self, request, sink):
        import threading

        from mlx_harmony_core.request import StreamEvent
        from mlx_harmony_core.server import END

        def run():
            sink(StreamEvent(delta="Hel"))
            sink(StreamEvent(delta="lo"))
            sink(RuntimeError("the model broke"))
            sink(END)

        threading.Thread(target=run, daemon=True).start()
        return self

    def cancel(self):
        pass

    def shutdown(self):
        pass

    def wait_idle(self, timeout):
        return True


def test_a_failure_mid_stream_is_error_then_response_failed(tmp_path):
    options = ServerOptions(model_name="f", web=False, responses_db=str(tmp_path / "r.db"))
    with ServerThread(FailingClient(), options) as url:
        events = sse(url, {"input": "hi"})
        r = post(url, {"input": "hi"})
    for i, e in enumerate(events):
        assert e["sequence_number"] == i
        check(e, EVENT_SCHEMAS[e["type"]])
    assert [e["type"] for e in events][-4:] == [
        "response.output_text.delta",
        "response.output_text.delta",
        "error",
        "response.failed",
    ]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "the model broke" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Hello"
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert rows(tmp_path / "r.db") == 0


def test_truncation_auto_drops_the_oldest_turns(encoding, tmp_path):
    model = ScriptedModel(replies=[[]])
    engine = mhc.Engine(model, encoding=encoding, context_length=400)
    history = []
    for i in range(12):
        history += [
            {"role": "user", "content": f"Question {i}: " + "words " * 10},
            {"role": "assistant", "content": f"Answer {i}: " + "more " * 10},
        ]
    history.append({"role": "user", "content": "Last question?"})
    options = ServerOptions(model_name="t", web=False, responses_db=str(tmp_path / "t.db"))
    with ServerThread(engine, options) as url:
        script(model, encoding, FINAL)
        r = post(url, {"input": history, "max_output_tokens": 16})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        script(model, encoding, FINAL)
        r = post(url, {"input": history, "max_output_tokens": 16, "truncation": "auto"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["truncation"] == "auto" and body["usage"]["input_tokens"] <= 400 - 16


def test_random_items_are_never_a_500(scripted, encoding):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    model, url, db = scripted
    n = rows(db)
    scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
    value = st.recursive(
        scalar,
        lambda s: st.lists(s, max_size=3) | st.dictionaries(st.text(max_size=6), s, max_size=3),
        max_leaves=6,
    )
    kinds = st.sampled_from(
        [
            "message",
            "reasoning",
            "function_call",
            "function_call_output",
            "custom_tool_call",
            "custom_tool_call_output",
            "item_reference",
            None,
        ]
    )
    keys = st.sampled_from(
        [
            "role",
            "content",
            "call_id",
            "name",
            "arguments",
            "output",
            "input",
            "encrypted_content",
            "summary",
            "id",
            "status",
        ]
    )
    item = st.builds(
        lambda k, extra: {**({"type": k} if k else {}), **extra},
        kinds,
        st.dictionaries(keys, value, max_size=4),
    )
    fields = st.fixed_dictionaries(
        {"input": st.one_of(st.text(max_size=5), st.lists(item, max_size=4))},
        optional={
            "tools": value,
            "tool_choice": value,
            "text": value,
            "reasoning": value,
            "include": value,
            "previous_response_id": value,
        },
    )

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    @given(body=fields)
    def run(body):
        script(model, encoding, FINAL)
        r = post(url, {**body, "max_output_tokens": 4, "store": False})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]

    run()
    assert rows(db) == n
