"""The built-in tools' loop in the engine: scripted Harmony tool calls (forced on the demo
model by a logits processor, so its real batched caches are used), the exact messages fed
back, the final output, usage, cache reuse, limits, cancellation."""

from __future__ import annotations

import threading
import time

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.harmony import load_encoding
from mlx_harmony_core.tool_loop import BUILTIN_CALL, ToolEvent
from support.tool_script import (
    FakeTools,
    ScriptProcessor,
    browser_call,
    builtin,
    final,
    python_call,
    toks,
)

builtin()  # the tools' module (ToolCall, ToolResult)
GREEDY = mhc.SamplingParams(temperature=0)


@pytest.fixture
def engine():
    eng = mhc.load("demo")
    eng.prefix_cache.max_entries = 1
    yield eng
    eng.close_tools()


def with_tools(engine, names=("python", "browser"), **kw):
    tools = FakeTools(names, **kw)
    engine.builtin_tools = {n: tools for n in names}
    engine.builtin_tools_fixed = True
    return tools


def decode(ids):
    return load_encoding().decode(ids)


def test_python_state_across_two_calls(engine):
    tools = with_tools(engine, ("python",))
    script = ScriptProcessor(
        [
            python_call("x = 6 * 7"),
            python_call("print(x + 1)", "Now use x."),
            final("The answer is 43."),
        ]
    )
    events = list(
        engine.stream(
            [{"role": "user", "content": "compute"}],
            GREEDY,
            builtin_tools=["python"],
            logits_processors=[script],
            max_tokens=200,
        )
    )
    c = events[-1].completion
    assert c.text == "The answer is 43." and c.finish_reason == "stop"
    assert [r.call.arguments for r in c.builtin_calls] == ["x = 6 * 7", "print(x + 1)"]
    assert [r.result.text for r in c.builtin_calls] == ["", "43\n"]
    assert all(r.id.startswith("ci_") for r in c.builtin_calls)
    # The exact tokens the model saw before its third reply: the tool messages in Harmony.
    third = decode(script.seen[2])
    assert third.endswith(
        "<|start|>assistant<|channel|>analysis to=python code<|message|>x = 6 * 7<|call|>"
        "<|start|>python to=assistant<|channel|>analysis<|message|><|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Now use x.<|end|>"
        "<|start|>assistant<|channel|>analysis to=python code<|message|>print(x + 1)<|call|>"
        "<|start|>python to=assistant<|channel|>analysis<|message|>43\n<|end|>"
        "<|start|>assistant"
    )
    assert "# Tools\n\n## python" in decode(script.seen[0])  # declared in the system message
    # Events: the calls' code as builtin_call deltas, a running and a done event per call.
    tool_events = [e for e in events if isinstance(e, ToolEvent)]
    assert [e.phase for e in tool_events] == ["running", "done", "running", "done"]
    code = "".join(
        e.delta for e in events if e.kind == BUILTIN_CALL and not isinstance(e, ToolEvent)
    )
    assert code == "x = 6 * 7print(x + 1)"
    # The reply's tokens: everything after the prompt (tool messages included).
    assert decode(c.tokens).endswith("The answer is 43.<|return|>")
    assert "<|start|>python to=assistant" in decode(c.tokens)
    # Usage adds up: each leg's prompt; the continuations found all but the tool message
    # in their held cache.
    n_tool_msg = len(toks("<|start|>python to=assistant<|channel|>analysis<|message|><|end|>"))
    assert c.usage.completion_tokens == sum(
        len(r) for r in (python_call("x = 6 * 7"), python_call("print(x + 1)", "Now use x."))
    ) + len(final("The answer is 43."))
    prefilled = c.usage.prompt_tokens - c.usage.cached_prompt_tokens
    first_prompt = len(script.seen[0])
    assert prefilled <= first_prompt + 2 * (n_tool_msg + 4)
    assert tools.ended and tools.ended[0].startswith("reply_")  # its own session, ended


def test_search_open_find_answer_with_citation(engine):
    with_tools(engine, ("browser",))
    script = ScriptProcessor(
        [
            browser_call("search", {"query": "mlx"}),
            browser_call("open", {"id": 0}),
            browser_call("find", {"pattern": "Apple"}),
            final("MLX runs on Apple silicon【1†L0-L0】."),
        ]
    )
    c = engine.generate(
        "what is mlx?", GREEDY, builtin_tools=["browser"], logits_processors=[script]
    )
    assert [r.call.recipient for r in c.builtin_calls] == [
        "browser.search",
        "browser.open",
        "browser.find",
    ]
    assert all(r.id.startswith("ws_") for r in c.builtin_calls)
    assert c.text == "MLX runs on Apple silicon【1†L0-L0】."
    text, annotations = c.cited
    assert text == "MLX runs on Apple silicon (docs.test)."
    assert annotations[0]["url"] == "http://docs.test/mlx"
    last = decode(script.seen[3])
    assert last.endswith(
        "<|start|>browser.find to=assistant<|channel|>analysis<|message|>[1] Find results\n"
        "L0: found 'Apple'<|end|><|start|>assistant"
    )
    assert "## browser" in decode(script.seen[0])


def test_max_tool_calls_reported_to_the_model(engine):
    tools = with_tools(engine, ("python",))
    loop = python_call("print(1)")
    script = ScriptProcessor([loop, loop, loop, final("done")])
    c = engine.generate(
        "go", GREEDY, builtin_tools=["python"], logits_processors=[script], max_tool_calls=2
    )
    assert c.text == "done" and len(c.builtin_calls) == 3
    assert len(tools.calls) == 2  # the third was not run
    assert c.builtin_calls[2].result.status == "failed"
    assert "limit of 2 tool calls" in c.builtin_calls[2].result.text
    assert "limit of 2 tool calls" in decode(script.seen[3])


def test_runaway_tool_calls_end_at_max_tokens(engine):
    with_tools(engine, ("python",))
    loop = python_call("1")
    c = engine.generate(
        "go",
        GREEDY,
        builtin_tools=["python"],
        logits_processors=[ScriptProcessor([loop])],
        max_tokens=len(loop) * 3 + 2,
        max_tool_calls=100,
    )
    assert c.finish_reason == "length"
    assert c.usage.completion_tokens == len(loop) * 3 + 2
    assert len(c.builtin_calls) == 3


def test_unknown_or_disabled_tool_is_an_error_for_the_model(engine):
    with_tools(engine, ("python",))
    script = ScriptProcessor([browser_call("search", {"query": "x"}), final("ok")])
    c = engine.generate("go", GREEDY, builtin_tools=["python"], logits_processors=[script])
    assert c.text == "ok"
    assert "no tool 'browser.search' here (enabled: python)" in c.builtin_calls[0].result.text


def test_requests_for_tools_not_enabled_or_unknown_are_refused(engine):
    with_tools(engine, ("python",))
    with pytest.raises(mhc.InvalidRequestError, match="'browser' is not enabled"):
        engine.request("hi", builtin_tools=["browser"])
    with pytest.raises(mhc.InvalidRequestError, match="unknown built-in tool 'shell'"):
        engine.request("hi", builtin_tools=["shell"])
    with pytest.raises(mhc.InvalidRequestError, match="max_tool_calls"):
        engine.request("hi", builtin_tools=["python"], max_tool_calls=-1)


def test_function_tools_still_end_the_reply(engine):
    with_tools(engine, ("python",))
    call = toks(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>'
    )
    weather = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    c = engine.generate(
        "weather?",
        GREEDY,
        builtin_tools=["python"],
        tools=[weather],
        logits_processors=[ScriptProcessor([call])],
    )
    assert c.finish_reason == "tool_calls" and c.tool_calls[0].name == "get_weather"
    assert c.builtin_calls == []


def test_cancel_while_a_tool_runs_and_others_keep_decoding(engine):
    tools = with_tools(engine, ("python",), delay=2.0)
    script = ScriptProcessor([python_call("1"), final("never")])
    handle = engine.submit(
        "go", GREEDY, builtin_tools=["python"], logits_processors=[script], max_tokens=100
    )
    assert tools.running.wait(30)
    # Another request decodes while the tool runs.
    t0 = time.perf_counter()
    other = engine.generate("hello", GREEDY, max_tokens=5)
    assert other.usage.completion_tokens == 5 and time.perf_counter() - t0 < 2.0
    handle.cancel()
    done = threading.Event()
    result = []
    threading.Thread(target=lambda: (result.append(handle.result()), done.set())).start()
    assert done.wait(1.0)  # at once, not after the tool's 2 s
    assert result[0].finish_reason == "cancelled"


def test_seeded_tool_loop_is_reproducible(engine):
    with_tools(engine, ("python",))
    params = mhc.SamplingParams(temperature=1.0, seed=3)
    outs = []
    for _ in range(2):
        script = ScriptProcessor([python_call("print(2)"), final("two")])
        c = engine.generate("go", params, builtin_tools=["python"], logits_processors=[script])
        outs.append(c.tokens)
    assert outs[0] == outs[1]


def test_continuation_reuses_the_held_cache(engine):
    """The second leg prefills only the tool message, even when another request used the
    one-entry prefix cache while the tool ran."""
    tools = with_tools(engine, ("python",), delay=0.5)
    script = ScriptProcessor([python_call("print(5)"), final("five")])
    handle = engine.submit(
        [{"role": "user", "content": "a fairly long question " * 20}],
        GREEDY,
        builtin_tools=["python"],
        logits_processors=[script],
    )
    assert tools.running.wait(30)
    engine.generate("something else entirely", GREEDY, max_tokens=3)  # takes the LRU slot
    c = handle.result()
    assert c.text == "five"
    first_prompt = len(script.seen[0])
    leg1 = len(python_call("print(5)"))
    # Leg 2's prompt is the first prompt, leg 1's reply, the tool message and the primer;
    # all but (at most) the tool message and primer came from the held cache.
    assert c.usage.prompt_tokens == first_prompt + len(script.seen[1])
    assert c.usage.cached_prompt_tokens >= first_prompt + leg1 - 1


@pytest.mark.slow
def test_random_demo_model_with_real_tools_100_replies():
    """The random-weight demo model with the real python and browser tools enabled: 100
    sampled replies (batched), none raises; whatever it calls is answered."""
    eng = mhc.load("demo")
    try:
        prompts = [
            {"messages": [{"role": "user", "content": f"question {i}"}], "params": p}
            for i in range(100)
            for p in [mhc.SamplingParams(temperature=1.0, seed=i)]
        ]
        out = eng.generate_batch(
            prompts, builtin_tools=["python", "browser"], max_tokens=24, max_tool_calls=2
        )
        assert len(out) == 100
        assert {c.finish_reason for c in out} <= {"stop", "length", "tool_calls"}
        assert all(c.usage.completion_tokens <= 24 for c in out)
    finally:
        eng.close_tools()


def test_real_python_tool_keeps_state_across_calls(engine):
    """The sandboxed python tool (not a stand-in): a variable set by one call is read by
    the next in the same reply."""
    script = ScriptProcessor([python_call("x = 6 * 7"), python_call("print(x + 1)"), final("43")])
    c = engine.generate("go", GREEDY, builtin_tools=["python"], logits_processors=[script])
    assert c.text == "43"
    assert c.builtin_calls[1].result.text.strip() == "43"
    assert c.builtin_calls[1].result.status == "completed"
    assert "43\n<|end|><|start|>assistant" in decode(script.seen[2]) or decode(
        script.seen[2]
    ).endswith("43<|end|><|start|>assistant")


def test_two_tool_replies_batched_together(engine):
    """Rows of one batch: each leaves for its tool (its cache extracted from the batch) and
    rejoins from it; the answers and the cached counts are each reply's own."""
    with_tools(engine, ("python",), delay=0.2)
    scripts = [ScriptProcessor([python_call(f"print({n})"), final(f"answer {n}")]) for n in (1, 2)]
    handles = [
        engine.submit(
            f"question number {n} " * 10,
            GREEDY,
            builtin_tools=["python"],
            logits_processors=[s],
        )
        for n, s in zip((1, 2), scripts, strict=True)
    ]
    results = [h.result() for h in handles]
    assert [c.text for c in results] == ["answer 1", "answer 2"]
    for c, s in zip(results, scripts, strict=True):
        assert c.builtin_calls[0].result.text.strip() == c.text[-1]
        leg1 = len(python_call("print(1)"))
        assert c.usage.cached_prompt_tokens >= len(s.seen[0]) + leg1 - 1


def test_real_browser_search_open_find_and_cite(engine, tmp_path):
    """The real browser over a local FTS5 index built from a temp folder: search -> open ->
    find -> an answer whose citation becomes a url_citation."""
    from mlx_harmony_core.tools.options import BuiltinToolOptions

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "mlx.md").write_text(
        "# MLX\n\nMLX is an array framework for machine learning research.\n"
        "It runs on Apple silicon with unified memory.\n"
    )
    engine.enable_tools(
        ["browser"], BuiltinToolOptions(browser_index=docs, browser_index_db=tmp_path / "i.db")
    )
    script = ScriptProcessor(
        [
            browser_call("search", {"query": "apple silicon"}),
            browser_call("open", {"id": 0}),
            browser_call("find", {"pattern": "unified"}),
            final("It runs on Apple silicon【1†L3-L3】."),
        ]
    )
    c = engine.generate("where does mlx run?", GREEDY, builtin_tools=["browser"],
                        logits_processors=[script])  # fmt: skip
    assert [r.result.status for r in c.builtin_calls] == ["completed"] * 3
    assert [r.result.details["action"]["type"] for r in c.builtin_calls] == [
        "search",
        "open_page",
        "find",
    ]
    seen = decode(script.seen[3])
    assert (
        "<|start|>browser.find to=assistant<|channel|>analysis<|message|>[2] Find results" in seen
    )
    assert "It runs on Apple silicon with unified memory.<|end|><|start|>assistant" in seen
    text, annotations = c.cited
    assert annotations[0]["url"] == "local://mlx.md" and annotations[0]["title"] == "MLX"
    span = text[annotations[0]["start_index"] : annotations[0]["end_index"]]
    assert "local://mlx.md" in span and "【" not in text


def test_reasoning_budget_is_the_replys(engine):
    """max_reasoning_tokens bounds the reasoning of the whole reply, across its legs."""
    with_tools(engine, ("python",))
    script = ScriptProcessor(
        [python_call("print(1)", "one two three"), python_call("print(2)", "four five six")]
    )
    c = engine.generate(
        "go",
        GREEDY,
        builtin_tools=["python"],
        logits_processors=[script],
        max_reasoning_tokens=4,
        max_tokens=120,
    )
    assert c.usage.reasoning_tokens <= 4
