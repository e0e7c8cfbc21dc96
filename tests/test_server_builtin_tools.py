"""Built-in tools through the server: ``/v1/responses`` (``code_interpreter`` and
``web_search`` tools -> ``code_interpreter_call`` / ``web_search_call`` items with their
streamed events, ``url_citation`` annotations) with the official ``openai`` client and
OpenAI's schema, and chat completions' ``builtin_tools`` extension (results shown as
reasoning). Nothing runs unless the server enables a tool and the request declares it."""

from __future__ import annotations

import httpx
import openai
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.harmony import load_encoding
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.testing import ServerThread
from support.tool_script import FakeTools, ScriptProcessor, browser_call, final, python_call
from test_responses import EVENT_SCHEMAS, check

SCRIPT: dict[str, ScriptProcessor] = {}  # the current test's script (the engine reads it)

EVENT_SCHEMAS = {
    **EVENT_SCHEMAS,
    "response.code_interpreter_call.in_progress": "ResponseCodeInterpreterCallInProgressEvent",
    "response.code_interpreter_call_code.delta": "ResponseCodeInterpreterCallCodeDeltaEvent",
    "response.code_interpreter_call_code.done": "ResponseCodeInterpreterCallCodeDoneEvent",
    "response.code_interpreter_call.interpreting": "ResponseCodeInterpreterCallInterpretingEvent",
    "response.code_interpreter_call.completed": "ResponseCodeInterpreterCallCompletedEvent",
    "response.web_search_call.in_progress": "ResponseWebSearchCallInProgressEvent",
    "response.web_search_call.searching": "ResponseWebSearchCallSearchingEvent",
    "response.web_search_call.completed": "ResponseWebSearchCallCompletedEvent",
    "response.output_text.annotation.added": "ResponseOutputTextAnnotationAddedEvent",
}


def scripted(tokens, logits):
    return SCRIPT["now"](tokens, logits)


class ScriptedEngine(mhc.Engine):
    """The demo model whose every request follows the current script."""

    def request(self, messages, params=None, options=None, **kw):
        kw.setdefault("logits_processors", [scripted])
        return super().request(messages, mhc.SamplingParams(temperature=0), options, **kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo = mhc.load("demo")
    engine = ScriptedEngine(demo.model, chat_format=demo.chat_format, config=demo.config)
    tools = FakeTools(("python", "browser"))
    engine.builtin_tools = {"python": tools, "browser": tools}
    db = tmp_path_factory.mktemp("responses") / "responses.db"
    options = ServerOptions(
        model_name="demo", responses_db=str(db), tools=("python", "browser"), max_tool_calls=4
    )
    with ServerThread(engine, options) as url:
        yield url, tools


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    demo = mhc.load("demo")
    db = tmp_path_factory.mktemp("responses") / "responses.db"
    with ServerThread(demo, ServerOptions(model_name="demo", responses_db=str(db))) as url:
        yield url


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def use(*replies):
    SCRIPT["now"] = ScriptProcessor(replies)
    return SCRIPT["now"]


def test_code_interpreter_streamed_with_the_openai_client(served):
    url, _ = served
    script = use(python_call("x = 20"), python_call("print(x + 1)"), final("It is 21."))
    stream = client(url).responses.create(
        model="demo",
        input="compute",
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
        include=["code_interpreter_call.outputs"],
        stream=True,
    )
    events = [e.model_dump(mode="json", exclude_unset=True) for e in stream]
    for i, e in enumerate(events):
        assert e["sequence_number"] == i
        check(e, EVENT_SCHEMAS[e["type"]])
    types = [e["type"] for e in events]
    calls = [i for i, t in enumerate(types) if t == "response.code_interpreter_call.in_progress"]
    assert len(calls) == 2
    first = types[calls[0] - 1 :]
    assert first[:2] == ["response.output_item.added", "response.code_interpreter_call.in_progress"]
    done = first.index("response.code_interpreter_call_code.done")
    assert done > 2 and set(first[2:done]) == {"response.code_interpreter_call_code.delta"}
    assert first[done : done + 4] == [
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
    ]
    response = events[-1]["response"]
    check(response, "Response")
    out = response["output"]
    assert [o["type"] for o in out] == [
        "reasoning",
        "code_interpreter_call",
        "reasoning",
        "code_interpreter_call",
        "message",
    ]
    assert out[1]["code"] == "x = 20" and out[1]["status"] == "completed"
    assert out[3]["outputs"] == [{"type": "logs", "logs": "21\n"}]
    assert out[4]["content"][0]["text"] == "It is 21."
    # The model read the tool's output as Harmony's tool message.
    seen = load_encoding().decode(script.seen[2])
    assert seen.endswith("<|start|>python to=assistant<|channel|>analysis<|message|>21\n<|end|>"
                         "<|start|>assistant")  # fmt: skip
    usage = response["usage"]
    assert usage["input_tokens"] > usage["input_tokens_details"]["cached_tokens"] > 0


def test_web_search_items_and_url_citation(served):
    url, _ = served
    use(
        browser_call("search", {"query": "mlx"}),
        browser_call("find", {"pattern": "Apple"}),
        final("On Apple silicon【1†L0-L0】."),
    )
    events = [
        e.model_dump(mode="json", exclude_unset=True)
        for e in client(url).responses.create(
            model="demo", input="what is mlx?", tools=[{"type": "web_search"}], stream=True
        )
    ]
    for e in events:
        check(e, EVENT_SCHEMAS[e["type"]])
    types = [e["type"] for e in events]
    assert types.count("response.web_search_call.searching") == 2
    assert types.count("response.output_text.annotation.added") == 1
    response = events[-1]["response"]
    check(response, "Response")
    calls = [o for o in response["output"] if o["type"] == "web_search_call"]
    assert [c["action"]["type"] for c in calls] == ["search", "find_in_page"]
    assert calls[0]["action"]["query"] == "mlx" and calls[0]["status"] == "completed"
    text = response["output"][-1]["content"][0]
    assert text["text"] == "On Apple silicon (docs.test)."
    assert text["annotations"] == [
        {
            "type": "url_citation",
            "url": "http://docs.test/mlx",
            "title": "MLX docs",
            "start_index": 16,
            "end_index": 28,
        }
    ]
    # Not streamed: the same items in one body.
    use(browser_call("search", {"query": "mlx"}), final("Done."))
    body = client(url).responses.create(
        model="demo", input="again", tools=[{"type": "web_search_preview"}]
    )
    check(body.model_dump(mode="json", exclude_unset=True), "Response")
    assert [o.type for o in body.output][-2:] == ["web_search_call", "message"]


def test_a_stored_response_with_tool_calls_continues(served):
    url, _ = served
    use(python_call("print(1)"), final("One."))
    c = client(url)
    first = c.responses.create(model="demo", input="go", tools=[{"type": "code_interpreter",
                                                                  "container": {"type": "auto"}}])  # fmt: skip
    use(final("Two."))
    second = c.responses.create(model="demo", input="and again", previous_response_id=first.id)
    assert second.output_text == "Two."
    items = c.responses.input_items.list(second.id)
    assert items.data


def test_max_tool_calls_of_the_request_and_the_server(served):
    url, tools = served
    loop = python_call("print(3)")
    use(loop, loop, loop, final("ok"))
    before = len(tools.calls)
    r = client(url).responses.create(
        model="demo",
        input="go",
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
        max_tool_calls=1,
    )
    assert len(tools.calls) - before == 1
    statuses = [o.status for o in r.output if o.type == "code_interpreter_call"]
    assert statuses == ["completed", "failed", "failed"]


def test_chat_completions_opt_in_and_reasoning(served):
    url, _ = served
    use(python_call("print(6 * 7)"), final("42"))
    c = client(url)
    r = c.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "6*7?"}],
        extra_body={"builtin_tools": ["python"]},
    )
    msg = r.choices[0].message
    assert msg.content == "42" and r.choices[0].finish_reason == "stop"
    reasoning = msg.model_extra["reasoning_content"]
    assert "[python] print(6 * 7)" in reasoning and "[python: completed]\n42" in reasoning
    assert msg.tool_calls is None
    use(python_call("print(6 * 7)"), final("42"))
    chunks = list(
        c.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "6*7?"}],
            extra_body={"builtin_tools": ["python"]},
            stream=True,
        )
    )
    streamed = "".join(
        (ch.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for ch in chunks
        if ch.choices
    )
    assert streamed == reasoning
    assert all(not ch.choices or ch.choices[0].delta.tool_calls is None for ch in chunks)


def test_chat_completions_without_opt_in_runs_nothing(served):
    url, tools = served
    use(python_call("print(1)"), final("no"))
    before = len(tools.calls)
    r = client(url).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}]
    )
    assert len(tools.calls) == before  # the call ends the reply, as without tools
    assert r.choices[0].message.content == ""


def test_tools_the_server_did_not_enable_are_a_400(plain):
    c = client(plain)
    with pytest.raises(openai.BadRequestError, match="does not run"):
        c.responses.create(model="demo", input="hi", tools=[{"type": "code_interpreter",
                                                              "container": {"type": "auto"}}])  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="serve --tools browser"):
        c.responses.create(model="demo", input="hi", tools=[{"type": "web_search"}])
    r = httpx.post(
        plain + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "builtin_tools": ["python"]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "builtin_tools[0]"
    r = httpx.post(
        plain + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "builtin_tools": ["shell"]},
    )
    assert r.status_code == 400


def test_tool_flags_come_from_the_tools_options():
    from mlx_harmony_core.cli import build_parser
    from mlx_harmony_core.cli.common import option_values
    from mlx_harmony_core.cli.tool_flags import tool_names, tool_options

    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--tools", "python,browser", "--python-timeout-s", "5",
         "--browser-allow-private", "--max-tool-calls", "3"]
    )  # fmt: skip
    values = option_values(args, ServerOptions)
    assert values["max_tool_calls"] == 3
    assert [n for t in values["tools"] for n in tool_names(t)] == ["python", "browser"]
    opts = tool_options(args)
    assert opts.python_timeout_s == 5 and opts.browser_allow_private
    with pytest.raises(ValueError, match="--python-timeout-s"):
        tool_options(parser.parse_args(["serve", "--python-timeout-s", "0"]))
    chat = parser.parse_args(["chat", "--tools", "python", "--max-tool-calls", "2"])
    assert chat.tools == ["python"] and chat.max_tool_calls == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--tools", "shell"])


def test_python_state_lives_on_across_a_response_chain(served):
    url, _ = served
    c = client(url)
    ci = [{"type": "code_interpreter", "container": {"type": "auto"}}]
    outputs = ["code_interpreter_call.outputs"]
    use(python_call("y = 5"), final("set"))
    first = c.responses.create(model="demo", input="set y", tools=ci)
    use(python_call("print(y)"), final("printed"))
    second = c.responses.create(
        model="demo", input="print y", tools=ci, include=outputs, previous_response_id=first.id
    )
    third = c.responses.create(
        model="demo", input="print y", tools=ci, include=outputs, previous_response_id=second.id
    )
    for r in (second, third):
        call = next(o for o in r.output if o.type == "code_interpreter_call")
        assert call.outputs[0].logs == "5\n"
    use(python_call("print(y)"), final("printed"))
    fresh = c.responses.create(model="demo", input="print y", tools=ci, include=outputs)
    call = next(o for o in fresh.output if o.type == "code_interpreter_call")
    assert "NameError" in call.outputs[0].logs and call.status == "failed"
