"""Speculative decoding is exact: the tokens of plain decoding (greedy and seeded), with both
drafters, past the sliding window, with quantized KV, stop strings and prefix reuse."""

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.speculative import NgramDrafter

GREEDY = mhc.SamplingParams(temperature=0.0)
COPY = "Repeat after me: the quick brown fox jumps over the lazy dog, twice. " * 3


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """An unrelated random model with the same vocabulary: its drafts are almost never right."""
    path = mhc.make_test_model(tmp_path_factory.mktemp("m") / "other", preset="demo", seed=7)
    return mhc.load(path)


def _both(engine, prompt, params, n, **spec):
    plain = engine.generate(prompt, params, max_tokens=n, ignore_eos=True)
    fast = engine.generate(prompt, params, max_tokens=n, ignore_eos=True, **spec)
    return plain, fast


@pytest.mark.parametrize("drafter", ["ngram", "self", "other"])
def test_greedy_is_plain_decoding_past_the_window(demo_engine, other, drafter):
    spec = {"speculative": "ngram"} if drafter == "ngram" else {"speculative": "draft"}
    if drafter != "ngram":
        spec["draft_model"] = demo_engine if drafter == "self" else other
    plain, fast = _both(demo_engine, COPY, GREEDY, 520, **spec)  # window 128: wrapped
    assert fast.tokens == plain.tokens
    u = fast.usage
    assert u.drafted_tokens > 0 and 0 <= u.accepted_tokens <= u.drafted_tokens
    if drafter == "self":
        assert u.accepted_tokens == u.drafted_tokens  # the target drafts for itself
    if drafter == "other":
        assert u.accepted_tokens <= 0.2 * u.drafted_tokens


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
        dict(temperature=0.7, presence_penalty=0.5, logit_bias={13: 2.0}),
    ],
)
def test_seeded_sampling_is_plain_decoding(demo_engine, params):
    """Each position draws with plain decoding's key from the same distribution, so every
    seed gives the same tokens: the distributions are equal (a chi-square test would pass
    trivially on these counts)."""
    for seed in range(12):
        p = mhc.SamplingParams(seed=seed, **params)
        plain, fast = _both(demo_engine, COPY, p, 24, speculative="draft", draft_model=demo_engine)
        assert fast.tokens == plain.tokens, seed
        assert fast.usage.drafted_tokens > 0


def test_quantized_kv_stop_strings_and_prefix_reuse(demo_engine):
    engine = mhc.load("demo", cache_options={"kv_bits": 8})
    spec = {"speculative": "draft", "draft_model": demo_engine}
    plain, fast = _both(engine, COPY, GREEDY, 200, **spec)
    assert fast.tokens == plain.tokens
    # A stop string ends the speculative reply where it ends the plain one.
    text = plain.text
    stop = text[40:46] if len(text) > 60 else None
    if stop:
        a = engine.generate(COPY, GREEDY, max_tokens=200, stop=[stop])
        b = engine.generate(COPY, GREEDY, max_tokens=200, stop=[stop], **spec)
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
    # The kept cache holds only verified tokens: a follow-up turn reuses it exactly.
    turn = [{"role": "user", "content": COPY}]
    first = engine.generate(turn, GREEDY, max_tokens=40, **spec)
    follow = [
        *turn,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "again"},
    ]
    reused = engine.generate(follow, GREEDY, max_tokens=30, **spec)
    engine.reset_cache()
    fresh = engine.generate(follow, GREEDY, max_tokens=30)
    assert reused.tokens == fresh.tokens


def test_ngram_lookup():
    d = NgramDrafter(max_ngram=3)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]  # the longest match wins
    assert d.propose([7, 1, 2, 7, 1, 3, 7, 1], 2) == [3, 7]  # the latest occurrence
    assert d.propose([1, 2, 3], 4) == []


@pytest.mark.parametrize(
    "options, match",
    [
        ({"speculative": "magic"}, "'ngram' or 'draft'"),
        ({"speculative": "draft"}, "needs a draft_model"),
        ({"speculative": "ngram", "num_draft": 0}, "num_draft"),
        ({"num_draft": 3}, "need speculative"),
    ],
)
def test_bad_options(demo_engine, options, match):
    with pytest.raises(mhc.InvalidRequestError, match=match):
        demo_engine.request("x", **options)


def test_a_draft_model_needs_the_same_vocabulary(demo_engine):
    from mlx_harmony_core.testing import ScriptedModel

    small = mhc.Engine(ScriptedModel([], 0, vocab_size=1000), encoding=demo_engine.encoding)
    small.vocab_size = 1000
    with pytest.raises(mhc.InvalidRequestError, match="vocabulary"):
        demo_engine.request("x", speculative="draft", draft_model=small)


def test_the_scheduler_speculates_while_a_request_is_alone(demo_engine):
    """Through the batching scheduler (the server's path): alone, a request speculates;
    when another arrives it goes on in the batch, and both get their plain tokens."""
    import time

    spec = {"speculative": "draft", "draft_model": demo_engine}
    plain = demo_engine.generate(COPY, GREEDY, max_tokens=160, ignore_eos=True).tokens
    alone = demo_engine.submit(COPY, GREEDY, max_tokens=160, ignore_eos=True, **spec).result()
    assert alone.tokens == plain and alone.usage.drafted_tokens > 0
    first = demo_engine.submit(COPY, GREEDY, max_tokens=160, ignore_eos=True, **spec)
    time.sleep(0.2)
    second = demo_engine.submit("another", GREEDY, max_tokens=40, ignore_eos=True)
    want = demo_engine.generate("another", GREEDY, max_tokens=40, ignore_eos=True).tokens
    assert first.result().tokens == plain
    assert second.result().tokens == want


def test_server_flag_and_usage(demo_engine):
    httpx = pytest.importorskip("httpx")
    from mlx_harmony_core.server import ServerOptions
    from mlx_harmony_core.testing import ServerThread

    engine = mhc.load("demo")
    options = ServerOptions(model_name="demo", speculative="draft", draft_model=engine)
    with ServerThread(engine, options) as url:
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": COPY}],
            "temperature": 0,
            "max_tokens": 30,
        }
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        details = r["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] > 0
        assert details["rejected_prediction_tokens"] == 0  # the target drafts for itself
    plain = demo_engine.generate([body["messages"][0]], GREEDY, max_tokens=30)
    assert r["choices"][0]["message"]["content"] == plain.text


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.5, top_k=8)])
def test_the_acceptance_rule_keeps_the_distribution(demo_engine, params):
    """The first speculative draw, with the likeliest token as the draft, follows the
    target's distribution after every control (chi-square against a numpy reference)."""
    import mlx.core as mx
    import numpy as np

    from mlx_harmony_core.speculative import Speculation
    from support.stats import assert_distribution

    prompt = demo_engine.render("hello")
    logits = np.array(demo_engine.model(mx.array([prompt]))[0, -1], dtype=np.float64)
    z = logits / params["temperature"]
    if "top_k" in params:
        z[z < np.sort(z)[-params["top_k"]]] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    draft = int(np.argmax(probs))

    class Fixed:  # always guesses the likeliest first token
        def start(self, prompt):
            pass

        def propose(self, tokens, k):
            return [draft]

    samples = []
    for seed in range(1000):
        req = demo_engine.request(
            prompt, mhc.SamplingParams(seed=seed, **params), max_tokens=2, speculative="ngram"
        )
        req.speculation = Speculation(Fixed(), 1)
        demo_engine.reset_cache()
        first = next(e for e in demo_engine.run(req) if e.completion is not None).completion
        samples.append(first.tokens[0])
        assert first.usage.drafted_tokens == 1
    assert_distribution(np.array(samples), probs)
