"""The engine: generation on the demo model and on scripted token sequences."""

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.testing import ScriptedModel


def scripted_engine(encoding, text, messages="Hi", **kw):
    script = encoding.encode(text, allowed_special="all")
    engine = mhc.Engine(ScriptedModel([], 0), encoding=encoding)
    n = len(engine.render(messages, **kw))
    engine.model = ScriptedModel(script, n)
    return engine


def test_demo_generation_reaches_length(demo_engine):
    c = demo_engine.generate("Hello", mhc.SamplingParams(temperature=0.0), max_tokens=12)
    assert c.finish_reason == "length"
    assert c.usage.completion_tokens == 12 and len(c.tokens) == 12
    assert c.usage.prompt_tokens == len(mhc.render_prompt("Hello"))
    assert c.timings.decode_tokens_per_s > 0 and c.timings.ttft_s > 0
    assert c.timings.peak_memory_bytes > 0


def test_demo_greedy_is_deterministic(demo_engine):
    a = demo_engine.generate("Hello", mhc.SamplingParams(temperature=0.0), max_tokens=8)
    b = demo_engine.generate("Hello", mhc.SamplingParams(temperature=0.0), max_tokens=8)
    assert a.tokens == b.tokens and a.text == b.text


def test_demo_seeded_sampling_is_deterministic(demo_engine):
    p = mhc.SamplingParams(temperature=1.0, seed=3)
    assert (
        demo_engine.generate("Hi", p, max_tokens=8).tokens
        == demo_engine.generate("Hi", p, max_tokens=8).tokens
    )


def test_stop_on_return_with_channels(encoding):
    engine = scripted_engine(
        encoding,
        "<|channel|>analysis<|message|>Thinking.<|end|><|start|>assistant"
        "<|channel|>final<|message|>The answer is 4.<|return|>never shown",
    )
    c = engine.generate("Hi", mhc.SamplingParams(temperature=0.0), max_tokens=100)
    assert c.finish_reason == "stop"
    assert c.text == "The answer is 4."
    assert c.reasoning == "Thinking."
    assert c.tokens[-1] == 200002


def test_stop_on_call_gives_tool_calls(encoding):
    engine = scripted_engine(
        encoding,
        '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1, "b": 2}<|call|>',
    )
    c = engine.generate("Hi", mhc.SamplingParams(temperature=0.0), max_tokens=100)
    assert c.finish_reason == "tool_calls"
    assert c.tool_calls[0].name == "add" and c.tool_calls[0].parsed_arguments() == {"a": 1, "b": 2}


def test_stream_events_sum_to_completion(encoding):
    engine = scripted_engine(encoding, "<|channel|>final<|message|>Streaming works fine.<|return|>")
    events = list(engine.stream("Hi", mhc.SamplingParams(temperature=0.0), max_tokens=50))
    assert events[-1].finish_reason == "stop"
    text = "".join(e.delta for e in events[:-1] if e.channel == "final")
    assert text == events[-1].completion.text == "Streaming works fine."
    assert len([e for e in events if e.delta]) > 1  # incremental, not one blob


def test_length_limit_keeps_partial_text(encoding):
    engine = scripted_engine(
        encoding, "<|channel|>final<|message|>one two three four five six<|return|>"
    )
    c = engine.generate("Hi", mhc.SamplingParams(temperature=0.0), max_tokens=6)
    assert c.finish_reason == "length" and c.text == "one two three"


def test_bad_arguments(demo_engine):
    with pytest.raises(ValueError, match="max_tokens"):
        demo_engine.generate("Hi", max_tokens=0)
    with pytest.raises(TypeError, match="SamplingParams"):
        demo_engine.generate("Hi", {"temperature": 0})
    with pytest.raises(ValueError, match="role"):
        demo_engine.generate([{"role": "wizard", "content": "x"}])
    with pytest.raises(TypeError):
        demo_engine.generate(42)
    with pytest.raises(ValueError, match="reasoning_effort"):
        demo_engine.generate("Hi", reasoning_effort="extreme")


def test_prompt_longer_than_context(encoding):
    engine = mhc.Engine(ScriptedModel([], 0), encoding=encoding, context_length=10)
    with pytest.raises(ValueError, match="context window"):
        engine.generate("a fairly long prompt " * 5)


def _mlx_lm_tokens(model, prompt, n, **processors):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    procs = make_logits_processors(**processors) if processors else None
    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n, logits_processors=procs):
        out.append(int(tok))
    return out


def test_greedy_tokens_equal_mlx_lm_generate_step(demo_engine):
    prompt = mhc.render_prompt("Tell me a story")
    ours = demo_engine.generate(prompt, mhc.SamplingParams(temperature=0.0), max_tokens=24).tokens
    assert ours == _mlx_lm_tokens(demo_engine.model, prompt, 24)[: len(ours)]


def test_penalties_in_the_pipelined_loop_equal_mlx_lm(demo_engine):
    prompt = mhc.render_prompt("Repeat after me")
    p = mhc.SamplingParams(
        temperature=0.0, repetition_penalty=1.8, presence_penalty=0.7, repetition_context_size=16
    )
    ours = demo_engine.generate(prompt, p, max_tokens=40).tokens
    theirs = _mlx_lm_tokens(
        demo_engine.model,
        prompt,
        40,
        repetition_penalty=1.8,
        repetition_context_size=16,
        presence_penalty=0.7,
        presence_context_size=16,
    )
    assert ours == theirs[: len(ours)]
    plain = demo_engine.generate(prompt, mhc.SamplingParams(temperature=0.0), max_tokens=40).tokens
    assert plain != ours  # the penalty changed the output


def test_logprobs_recorded_per_token(demo_engine):
    c = demo_engine.generate("Hi", mhc.SamplingParams(temperature=0.0), max_tokens=5, logprobs=3)
    assert [lp.token for lp in c.logprobs] == c.tokens
    for lp in c.logprobs:
        assert lp.top[0][0] == lp.token  # greedy picks the most likely token
        assert abs(lp.top[0][1] - lp.logprob) < 1e-5 and len(lp.top) == 3


def test_ignore_eos_generates_exactly_max_tokens(encoding):
    engine = scripted_engine(encoding, "<|channel|>final<|message|>Hi<|return|>")
    c = engine.generate("Hi", mhc.SamplingParams(temperature=0.0), max_tokens=12, ignore_eos=True)
    assert c.finish_reason == "length" and len(c.tokens) == 12


def test_reset_cache_right_after_a_reply_forgets_it(demo_engine):
    # The scheduler hands a finished request's cache to the prefix cache after the reply's
    # last event; a reset_cache() in between must still forget it.
    msgs = [{"role": "user", "content": "Tell me about the sea. " * 20}]
    for _ in range(5):
        demo_engine.generate(msgs, max_tokens=3, ignore_eos=True)
        demo_engine.reset_cache()
        again = demo_engine.generate(msgs, max_tokens=3, ignore_eos=True)
        assert again.usage.cached_prompt_tokens == 0
        demo_engine.reset_cache()
