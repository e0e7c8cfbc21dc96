"""Structured outputs: JSON Schema, regex and Lark grammars enforced by the sampler's mask,
strict tool calls, and the reasoning budget; on the random-weight demo model, whose free
text is gibberish, so every valid output is the constraint's doing."""

import json
import re
import sys
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import harmony
from mlx_harmony_core.structured import grammars_for
from mlx_harmony_core.testing import ScriptedModel

sys.path.insert(0, str(Path(__file__).parent))
from support.structured_cases import ARITHMETIC, BOUNDED, KEY_VALUES, OPEN, REGEXES  # noqa: E402

SAMPLES = 20
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}


def _obj(props):
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def _rf(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _valid(schema, text):
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    jsonschema.Draft202012Validator(schema, format_checker=checker).validate(json.loads(text))


def _batch(engine, cases, max_tokens, **options):
    """Every case SAMPLES times at temperature 1 (seeds 0..), decoded together."""
    items = []
    for name, extra in cases.items():
        for seed in range(SAMPLES):
            params = mhc.SamplingParams(temperature=1.0, seed=seed)
            items.append({"messages": f"{name} please", "params": params, **extra})
    out = engine.generate_batch(items, max_tokens=max_tokens, **options)
    return {name: out[i * SAMPLES : (i + 1) * SAMPLES] for i, name in enumerate(cases)}


# -- JSON Schema -------------------------------------------------------------------------------
def test_thirty_schemas_always_validate(demo_engine):
    assert len(BOUNDED) >= 30
    schemas = {**BOUNDED, **OPEN}
    results = _batch(
        demo_engine,
        {n: {"response_format": _rf(s, n)} for n, s in schemas.items()},
        max_tokens=64,
        max_reasoning_tokens=0,
    )
    for name, completions in results.items():
        stopped = [c for c in completions if c.finish_reason == "stop"]
        for c in stopped:
            _valid(schemas[name], c.text)
            assert c.reasoning == ""  # max_reasoning_tokens=0: straight to the answer
        assert all(c.finish_reason in ("stop", "length") for c in completions)
        if name in BOUNDED:
            assert len(stopped) >= 0.9 * SAMPLES, (name, len(stopped))


def test_json_object_and_reasoning_first(demo_engine):
    c = demo_engine.generate(
        "an object",
        mhc.SamplingParams(temperature=1.0, seed=7),
        max_tokens=200,
        response_format={"type": "json_object"},
        max_reasoning_tokens=6,
    )
    enc = demo_engine.encoding
    body = c.tokens[c.tokens.index(harmony.MESSAGE) + 1 : c.tokens.index(harmony.END)]
    assert len(body) == 6
    text = enc.decode(c.tokens)
    assert text.startswith("<|channel|>analysis<|message|>")
    assert "<|end|><|start|>assistant<|channel|>final<|message|>" in text
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
        assert text.endswith("<|return|>")


# -- regexes and grammars -------------------------------------------------------------------------
def test_regexes_always_match(demo_engine):
    results = _batch(
        demo_engine, {n: {"regex": r} for n, r in REGEXES.items()}, 48, max_reasoning_tokens=0
    )
    for name, completions in results.items():
        stopped = [c for c in completions if c.finish_reason == "stop"]
        assert len(stopped) >= 0.9 * SAMPLES, name
        for c in stopped:
            assert re.fullmatch(REGEXES[name], c.text), (name, c.text)


def _arithmetic(text):
    """Parse ARITHMETIC's language; return the rest (empty when all of it parsed)."""
    m = re.match(r"[0-9]{1,2}", text)
    if m:
        return text[m.end() :]
    assert text.startswith("("), text
    rest = _arithmetic(text[1:])
    assert rest[:1] in ("+", "-", "*"), rest
    rest = _arithmetic(rest[1:])
    assert rest.startswith(")"), rest
    return rest[1:]


def test_lark_grammars_always_parse(demo_engine):
    results = _batch(
        demo_engine,
        {"arithmetic": {"grammar": ARITHMETIC}, "pairs": {"grammar": KEY_VALUES}},
        64,
        max_reasoning_tokens=0,
    )
    stopped = [c for c in results["arithmetic"] if c.finish_reason == "stop"]
    assert len(stopped) >= 0.9 * SAMPLES
    for c in stopped:
        assert _arithmetic(c.text) == "", c.text
    pair = r"[a-z]{1,5}=([0-9]{1,3}|true|false)"
    for c in results["pairs"]:
        assert c.finish_reason == "stop"
        assert re.fullmatch(rf"{pair}(,{pair}){{0,3}}", c.text), c.text


# -- every sampling control, stop strings, batching, streaming ------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.5, top_p=0.5),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=1.0, xtc_probability=1.0, xtc_threshold=0.01),
        dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=1.0),
        dict(temperature=0.0),
    ],
)
def test_masks_come_before_every_control(demo_engine, params):
    digit = demo_engine.encode("x")[0]
    c = demo_engine.generate(
        "digits",
        mhc.SamplingParams(seed=3, logit_bias={digit: 100.0}, **params),
        max_tokens=16,
        regex=r"[0-9]{3}",
        max_reasoning_tokens=0,
    )
    assert c.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}", c.text), c.text


def test_stop_strings_cut_the_constrained_answer(demo_engine):
    c = demo_engine.generate(
        "x", max_tokens=32, regex=r"abc-def", stop=["-"], max_reasoning_tokens=0
    )
    assert (c.text, c.finish_reason, c.stop_sequence) == ("abc", "stop", "-")


def test_streamed_equals_generated_and_batched_equals_alone(demo_engine):
    schema = BOUNDED["string_in_object"]
    opts = dict(max_tokens=64, response_format=_rf(schema), max_reasoning_tokens=3)
    params = [mhc.SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    alone = [demo_engine.generate("who", p, **opts) for p in params]
    streamed = "".join(
        e.delta for e in demo_engine.stream("who", params[0], **opts) if e.kind == "answer"
    )
    assert streamed == alone[0].text
    # In one batch beside unconstrained rows: the same tokens as alone, on both kinds.
    free = mhc.SamplingParams(temperature=0.8, seed=11)
    free_alone = demo_engine.generate("free", free, max_tokens=20, ignore_eos=True)
    items = [{"messages": "who", "params": p, **opts} for p in params]
    items.insert(1, {"messages": "free", "params": free, "max_tokens": 20, "ignore_eos": True})
    out = demo_engine.generate_batch(items)
    assert out[1].tokens == free_alone.tokens
    assert [c.tokens for c in out[:1] + out[2:]] == [c.tokens for c in alone]


# -- tool calls ------------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_strict_tool_calls_always_validate(demo_engine, choice):
    tools = [WEATHER, TIME]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    results = _batch(demo_engine, {"call": {"tools": tools, "tool_choice": choice}}, 64)
    calls = 0
    for c in results["call"]:
        if c.finish_reason == "tool_calls":
            for call in c.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
                calls += 1
    assert calls >= 0.9 * SAMPLES


def test_strict_tools_beside_a_constrained_answer(demo_engine):
    """With tools on 'auto' and a schema, the reply is a valid call or a valid answer."""
    schema = BOUNDED["object_int"]
    results = _batch(
        demo_engine,
        {"either": {"tools": [WEATHER], "response_format": _rf(schema)}},
        96,
        max_reasoning_tokens=4,
    )
    for c in results["either"]:
        if c.finish_reason == "stop":
            _valid(schema, c.text)
        for call in c.tool_calls:
            jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


# -- the reasoning budget -------------------------------------------------------------------------
def _analysis_forever(encoding, n=400):
    """A scripted model that opens the analysis channel and never closes it."""
    head = encoding.encode("<|channel|>analysis<|message|>", allowed_special="all")
    word = encoding.encode(" think")
    return head + word * n


@pytest.mark.parametrize("budget", [0, 1, 5, 40])
def test_reasoning_budget_closes_the_analysis(encoding, budget):
    script = _analysis_forever(encoding)
    model = ScriptedModel(script, 0)
    engine = mhc.Engine(model, encoding=encoding)
    prompt = engine.render("hi")
    model.prompt_length = len(prompt)
    c = engine.generate(prompt, max_tokens=60, max_reasoning_tokens=budget)
    text = encoding.decode(c.tokens)
    assert c.reasoning == " think" * budget
    opened = "<|channel|>final<|message|>"
    if budget == 0:
        assert text.startswith(opened)
    else:
        assert text.startswith(
            "<|channel|>analysis<|message|>"
            + " think" * budget
            + "<|end|><|start|>assistant"
            + opened
        )
    assert c.text  # the answer goes on after the forced header


def test_reasoning_budget_leaves_short_reasoning_alone(encoding):
    script = encoding.encode(
        "<|channel|>analysis<|message|>ok<|end|><|start|>assistant<|channel|>final<|message|>"
        "done<|return|>",
        allowed_special="all",
    )
    model = ScriptedModel(script, 0)
    engine = mhc.Engine(model, encoding=encoding)
    prompt = engine.render("hi")
    model.prompt_length = len(prompt)
    c = engine.generate(prompt, max_tokens=60, max_reasoning_tokens=50)
    assert (c.reasoning, c.text, c.finish_reason) == ("ok", "done", "stop")


# -- another model family: the whole reply is constrained ------------------------------------------
@pytest.fixture(scope="module")
def template_engine():
    from mlx_lm.models import llama
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from support.bpe import trained_tokenizer

    hf = trained_tokenizer('{"a": 12, "b": [true, false]} hello world')
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-5,
        vocab_size=hf.vocab_size + 6,  # padding rows past the tokenizer, as real models have
    )
    mx.random.seed(0)
    model = llama.Model(args)
    fmt = mhc.ChatTemplateFormat(TokenizerWrapper(hf))
    return mhc.Engine(model, chat_format=fmt, config={"vocab_size": args.vocab_size})


def test_other_families_constrain_the_whole_reply(template_engine):
    schema = _obj({"a": SMALL, "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}})
    for seed in range(10):
        params = mhc.SamplingParams(temperature=1.0, seed=seed)
        c = template_engine.generate(
            "hi", params, max_tokens=48, response_format=_rf(schema), max_reasoning_tokens=0
        )
        assert c.finish_reason == "stop"
        _valid(schema, c.text)
        assert c.tokens[-1] == template_engine.chat_format.stop_ids()[0]
        c = template_engine.generate("hi", params, max_tokens=16, regex=r"(hello|world) [0-9]")
        assert re.fullmatch(r"(hello|world) [0-9]", c.text), c.text


# -- errors, and the compiled-grammar cache ---------------------------------------------------------
@pytest.mark.parametrize(
    "options, param, message",
    [
        ({"response_format": {"type": "yaml"}}, "response_format", "not one of"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
        (
            {"response_format": _rf({"type": "nope"})},
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        (
            {"response_format": _rf({"type": "string", "pattern": "(?=a)b"})},
            "response_format",
            "cannot be enforced",
        ),
        ({"regex": "(unclosed"}, "regex", "cannot be enforced"),
        ({"grammar": "start: missing_rule"}, "grammar", "cannot be enforced"),
        ({"regex": "a", "grammar": "start: 'a'"}, None, "not several"),
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens", ">= 0"),
        (
            {"tools": [{**WEATHER, "function": {**WEATHER["function"], "strict": "yes"}}]},
            None,
            "strict",
        ),
    ],
)
def test_bad_constraints_are_clear_errors(demo_engine, options, param, message):
    with pytest.raises(mhc.InvalidRequestError, match=message) as info:
        demo_engine.request("x", **options)
    if param is not None:
        assert info.value.param == param


def test_compiled_grammars_are_reused(demo_engine):
    grammars = grammars_for(demo_engine.chat_format, demo_engine.vocab_size)
    schema = {"type": "object", "properties": {"unique_key_for_cache": {"type": "boolean"}}}
    demo_engine.request("x", response_format=_rf(schema))
    n = len(grammars)
    for _ in range(3):
        demo_engine.request("x", response_format=_rf(schema))
    assert len(grammars) == n


def test_the_grammar_knows_harmony_headers(demo_engine):
    """The reply grammar accepts what GPT-OSS writes: both header orders of a call."""
    tools = {"get_weather": None}
    text = harmony.reply_grammar(None, tools)
    grammars = grammars_for(demo_engine.chat_format, demo_engine.vocab_size)
    enc = demo_engine.encoding
    for reply in [
        "<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>",
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{}<|call|>",
        " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
        "<|channel|>commentary<|message|>a preamble<|end|><|start|>assistant<|channel|>final<|message|>x<|return|>",
    ]:
        m = grammars.matcher(text)
        assert m.consume_tokens(enc.encode(reply, allowed_special="all")), reply
        assert m.is_accepting() or m.is_stopped()
