"""Function tools: Harmony rendering, parsing of calls, forced calls and the tool loop."""

import json

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

import mlx_harmony_core as mhc
from mlx_harmony_core.testing import ScriptedModel
from mlx_harmony_core.tools import Tool, run_tool_loop

GREEDY = mhc.SamplingParams(temperature=0)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def toks(encoding, text):
    return list(encoding.encode(text, allowed_special="all"))


def call_reply(encoding, args='{"city": "Paris"}', name="get_weather"):
    return toks(
        encoding,
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
        f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{args}<|call|>",
    )


def final_reply(encoding, text="Sunny in Paris."):
    return toks(encoding, f"<|channel|>final<|message|>{text}<|return|>")


def test_tools_and_calls_render_as_openai_harmony(encoding):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning": "old thoughts"},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "Need the weather.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"sky": "sunny"}'},
    ]
    ours = mhc.render_prompt(messages, tools=[WEATHER], reasoning_effort="low")
    fn = WEATHER["function"]
    dev = (
        DeveloperContent.new()
        .with_instructions("Be brief.")
        .with_function_tools([ToolDescription.new(fn["name"], fn["description"], fn["parameters"])])
    )
    from openai_harmony import ReasoningEffort

    ref = Conversation.from_messages(
        [
            Message.from_role_and_content(
                Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)
            ),
            Message.from_role_and_content(Role.DEVELOPER, dev),
            Message.from_role_and_content(Role.USER, "Hi"),
            # the finished turn keeps only its answer
            Message.from_role_and_content(Role.ASSISTANT, "Hello!").with_channel("final"),
            Message.from_role_and_content(Role.USER, "Weather in Paris?"),
            # the turn with a pending call keeps its reasoning
            Message.from_role_and_content(Role.ASSISTANT, "Need the weather.").with_channel(
                "analysis"
            ),
            Message.from_role_and_content(Role.ASSISTANT, '{"city":"Paris"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"),
            Message.from_author_and_content(
                Author.new(Role.TOOL, "functions.get_weather"), '{"sky": "sunny"}'
            )
            .with_channel("commentary")
            .with_recipient("assistant"),
        ]
    )
    expected = encoding.render_conversation_for_completion(
        ref, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
    )
    assert ours == list(expected)
    assert "old thoughts" not in encoding.decode(ours)


def test_tool_choice_none_hides_tools_and_bad_tools_are_rejected(encoding):
    text = encoding.decode(mhc.render_prompt("x", tools=[WEATHER], tool_choice="none"))
    assert "get_weather" not in text
    with pytest.raises(ValueError, match="not among the tools"):
        mhc.render_prompt("x", tools=[WEATHER], tool_choice={"function": {"name": "nope"}})
    with pytest.raises(ValueError, match="must match"):
        mhc.render_prompt("x", tools=[{"type": "function", "function": {"name": "a b"}}])
    with pytest.raises(ValueError, match="only 'function'"):
        mhc.render_prompt("x", tools=[{"type": "web_search"}])
    with pytest.raises(ValueError, match="two tools"):
        mhc.render_prompt("x", tools=[WEATHER, WEATHER])
    with pytest.raises(ValueError, match="tool_call_id"):
        mhc.render_prompt([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}])


def test_analysis_final_and_call_sequences_parse_as_events(encoding):
    reply = toks(
        encoding,
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Answer.<|return|>",
    )
    engine = mhc.Engine(ScriptedModel(replies=[reply, call_reply(encoding)]), encoding=encoding)
    events = list(engine.stream("q", GREEDY))
    channels = [(e.channel, e.delta) for e in events[:-1]]
    assert "".join(d for c, d in channels if c == "analysis") == "Think."
    assert "".join(d for c, d in channels if c == "final") == "Answer."
    done = events[-1].completion
    assert (done.text, done.reasoning, done.finish_reason) == ("Answer.", "Think.", "stop")

    done = engine.generate("q", GREEDY, tools=[WEATHER])
    assert done.finish_reason == "tool_calls"
    (call,) = done.tool_calls
    assert call.name == "get_weather" and call.parsed_arguments() == {"city": "Paris"}
    assert call.id.startswith("call_") and len(call.id) > 10


def test_forced_tool_choice_opens_the_call(encoding):
    # The primer supplies the header; the model only writes the arguments.
    args = toks(encoding, '{"city": "Oslo"}<|call|>')
    model = ScriptedModel(replies=[args])
    engine = mhc.Engine(model, encoding=encoding)
    done = engine.generate(
        "x",
        GREEDY,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert done.finish_reason == "tool_calls"
    assert [(c.name, c.parsed_arguments()) for c in done.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert done.text == ""


def get_weather(city: str, unit: str = "C") -> dict:
    """Weather for a city.

    More text that is not the description."""
    if city == "Nowhere":
        raise LookupError("no such city")
    return {"city": city, "sky": "sunny", "unit": unit}


def test_tool_from_function():
    tool = Tool.from_function(get_weather)
    assert tool.description == "Weather for a city."
    assert tool.parameters["required"] == ["city"]
    assert tool.parameters["properties"]["unit"] == {"default": "C", "type": "string"}
    assert json.loads(tool.run('{"city": "Rome"}'))["sky"] == "sunny"
    assert tool.run("{bad").startswith("error: the arguments are not valid JSON")
    assert tool.run('{"city": "Nowhere"}') == "error: LookupError: no such city"
    assert tool.run('{"town": "Rome"}').startswith("error: TypeError")
    with pytest.raises(TypeError, match="kwargs"):
        Tool.from_function(lambda **kw: 1)


def test_tool_loop_runs_callables_and_continues(encoding):
    model = ScriptedModel(replies=[call_reply(encoding), final_reply(encoding)])
    engine = mhc.Engine(model, encoding=encoding)
    seen = []
    result = run_tool_loop(
        engine, "Weather in Paris?", [get_weather], GREEDY, on_call=lambda c, r: seen.append(r)
    )
    assert result.rounds == 2 and result.completion.text == "Sunny in Paris."
    assert json.loads(seen[0]) == {"city": "Paris", "sky": "sunny", "unit": "C"}
    roles = [m["role"] for m in result.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert result.messages[2]["tool_call_id"] == result.messages[1]["tool_calls"][0]["id"]


def test_tool_loop_limit_and_unknown_tools(encoding):
    model = ScriptedModel(replies=[call_reply(encoding, name="launch")])
    engine = mhc.Engine(model, encoding=encoding)
    results = []
    result = run_tool_loop(
        engine,
        "go",
        [Tool.from_function(get_weather)],
        GREEDY,
        max_rounds=2,
        on_call=lambda c, r: results.append(r),
    )
    assert result.rounds == 2 and result.completion.finish_reason == "tool_calls"
    assert results[0].startswith("error: there is no tool named 'launch'")
    with pytest.raises(ValueError):
        run_tool_loop(engine, "go", [get_weather], max_rounds=0)


def test_truncate_drops_oldest_turns(encoding):
    engine = mhc.Engine(ScriptedModel(replies=[final_reply(encoding, "ok")]), encoding=encoding)
    history = [{"role": "system", "content": "Keep me."}]
    for i in range(30):
        history += [
            {"role": "user", "content": f"question {i} " + "word " * 20},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    history.append({"role": "user", "content": "last question"})
    full = len(engine.render(history))
    engine.context_length = full // 2
    with pytest.raises(ValueError, match="context window"):
        engine.generate(history, GREEDY, max_tokens=8)
    done = engine.generate(history, GREEDY, max_tokens=8, truncate=True)
    assert done.usage.prompt_tokens + 8 <= engine.context_length
    assert done.text == "ok"
    prompt = encoding.decode(engine._truncate(history, engine.render(history), 8, {}))
    assert "Keep me." in prompt and "last question" in prompt
    assert "question 0 " not in prompt and "question 29" in prompt
