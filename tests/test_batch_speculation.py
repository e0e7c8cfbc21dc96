"""Speculation for every row of a batch: per-row rewinds of the batch cache (against single
caches), and batched verification through the scheduler (every row's tokens equal the same
request decoded alone and plainly)."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.kv_cache import (
    BatchKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_batch_cache,
)
from mlx_harmony_core.scheduler import Batch
from mlx_harmony_core.speculative import (
    MAX_RATE,
    NGRAM_PRIOR,
    NgramDrafter,
    Pacer,
    Speculation,
    best_width,
)

GREEDY = mhc.SamplingParams(temperature=0.0)
COPY = "Repeat after me: the quick brown fox jumps over the lazy dog, twice. " * 3


def _attend(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)


def _randn(rng, *shape):
    return mx.array(rng.normal(size=shape).astype(np.float32))


# -- the batch cache: each row rewinds by its own amount ------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: KVCache(),
        lambda: RotatingKVCache(8, 0, 6),
        lambda: RotatingKVCache(8, 0, "all"),
        lambda: QuantizedKVCache(8, 0),
    ],
    ids=["full", "window", "window-all", "quantized"],
)
def test_rows_rewind_alone_and_attend_like_single_caches(rng, make):
    """Every step writes T columns for every row and each row keeps its own number of
    them (a verify step): every query's attention equals its single cache's, step after
    step past the window, through joins, leaves and the squeezing out of holes."""
    singles, batch, order = [], make_batch_cache([make()])[0], []
    for step in range(60):
        if step in (0, 4, 13, 30):
            c = make()
            n = int(rng.integers(1, 20))
            c.update_and_fetch(_randn(rng, 1, 2, n, 16), _randn(rng, 1, 2, n, 16))
            singles.append(c)
            batch.insert(c)
            order.append(len(singles) - 1)
        if step == 35:
            batch.filter([i for i in range(len(order)) if i != 1])
            order.pop(1)
        B, T = len(order), int(rng.integers(1, 5))
        q, k, v = _randn(rng, B, 4, T, 16), _randn(rng, B, 2, T, 16), _randn(rng, B, 2, T, 16)
        mask = batch.make_mask(T, return_array=True)
        assert batch.offset.tolist() == [singles[s].offset for s in order]
        kb, vb = batch.update_and_fetch(k, v)
        out = _attend(q, kb, vb, mask)
        keep = [int(rng.integers(1, T + 1)) for _ in order]
        for row, s in enumerate(order):
            m1 = singles[s].make_mask(T, return_array=True) if T > 1 else None
            ks, vs = singles[s].update_and_fetch(k[row : row + 1], v[row : row + 1])
            ref = _attend(q[row : row + 1], ks, vs, m1)
            assert mx.abs(out[row : row + 1] - ref).max().item() < 1e-5, (step, row)
            assert singles[s].trim(T - keep[row]) == T - keep[row]
        assert batch.rewind([T - n for n in keep]) == [T - n for n in keep]
        assert batch.positions == [singles[s].offset for s in order]
    assert batch.width < 60 * 4  # holes were squeezed out
    for row, s in enumerate(order):
        got, want = batch.extract(row), singles[s]
        assert got.kind == want.kind and got.offset == want.offset
        tail = min(a.shape[2] for a in (*got.state, *want.state))
        for a, b in zip(got.state, want.state, strict=True):
            assert mx.array_equal(a[:, :, -tail:], b[:, :, -tail:]).item()


def test_rewind_limits_and_bad_input(rng):
    batch = BatchKVCache(4, 0)
    c = RotatingKVCache(4, 0, 0)
    for _ in range(10):  # one at a time: the window wraps and keeps only its tokens
        c.update_and_fetch(_randn(rng, 1, 2, 1, 16), _randn(rng, 1, 2, 1, 16))
    batch.insert(c)
    d = RotatingKVCache(4, 0, 0)
    d.update_and_fetch(_randn(rng, 1, 2, 2, 16), _randn(rng, 1, 2, 2, 16))
    batch.insert(d)
    # Each row rewinds at most what it can (its window must stay held).
    assert batch.trimmable(0) == c.trimmable() and batch.trimmable(1) == 2
    assert batch.rewind([100, 1]) == [c.trimmable(), 1]
    assert batch.held(1) == 1
    with pytest.raises(ValueError, match="one count per row"):
        batch.rewind([1])
    with pytest.raises(ValueError, match=">= 0"):
        batch.rewind([0, -1])
    with pytest.raises(ValueError, match="no row 2"):
        batch.trimmable(2)


# -- batched verification through the scheduler --------------------------------------------


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """An unrelated random model with the same vocabulary: its drafts are almost never right."""
    path = mhc.make_test_model(tmp_path_factory.mktemp("m") / "other", preset="demo", seed=7)
    return mhc.load(path)


def _mix(engine, other):
    """8 requests: prompt lookup, draft models (right and wrong), none, a token mask, a stop
    string, penalties, seeded sampling; long enough to pass the demo's 128-token window."""
    vocab = engine.vocab_size
    allowed = np.ones(vocab, bool)
    allowed[[13, 220, 290]] = False
    mask = mhc.pack_mask(allowed)
    seeded = mhc.SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    penal = mhc.SamplingParams(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.3)
    return [
        (COPY, GREEDY, {"max_tokens": 160, "speculative": "ngram"}),
        (COPY, GREEDY, {"max_tokens": 150, "speculative": "draft", "draft_model": engine}),
        ("Count to ten.", GREEDY, {"max_tokens": 140}),
        (COPY, GREEDY, {"max_tokens": 90, "speculative": "ngram", "token_mask": lambda r: mask}),
        ("Say hello.", seeded, {"max_tokens": 120, "speculative": "ngram"}),
        (COPY, penal, {"max_tokens": 130, "speculative": "draft", "draft_model": other}),
        (
            "Tell a story " * 6,
            seeded,
            {"max_tokens": 100, "speculative": "draft", "draft_model": engine},
        ),
        (
            COPY + " end",
            GREEDY,
            {"max_tokens": 140, "speculative": "ngram"},  # a stop string: set from its text
        ),
    ]


def _plain(engine, prompt, params, opts):
    plain = {k: v for k, v in opts.items() if k not in ("speculative", "draft_model")}
    return engine.generate(prompt, params, ignore_eos=True, **plain)


@pytest.fixture
def free_verify(monkeypatch):
    """Verify steps cost nothing (fixed, never measured): every row with a draft worth its
    position verifies it, whatever the machine's timings."""
    monkeypatch.setattr(Pacer, "PER_TOKEN", 0.0)
    monkeypatch.setattr(Pacer, "PER_DRAFT", 0.0)
    monkeypatch.setattr(Pacer, "MARGIN", 1.0)
    monkeypatch.setattr(Pacer, "_costs", lambda self, *a: None)


@pytest.fixture
def fixed_costs(monkeypatch):
    """Step costs fixed at their priors (never measured): plans do not depend on timings."""
    monkeypatch.setattr(Pacer, "_costs", lambda self, *a: None)


def test_eight_rows_speculate_together_and_equal_plain_decoding(demo_engine, other, free_verify):
    cases = _mix(demo_engine, other)
    text = _plain(demo_engine, *cases[7]).text
    cases[7][2]["stop"] = [text[len(text) // 2 : len(text) // 2 + 5]]
    want = [_plain(demo_engine, p, sp, o) for p, sp, o in cases]
    demo_engine.reset_cache()
    demo_engine.batching(max_batch=8, prefill_chunk=64)
    handles = [demo_engine.submit(p, sp, ignore_eos=True, **o) for p, sp, o in cases]
    got = [h.result(timeout=600) for h in handles]
    demo_engine.reset_cache()
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        assert b.tokens == a.tokens, i
        assert (b.text, b.finish_reason) == (a.text, a.finish_reason), i
    assert got[7].finish_reason == "stop"
    assert got[0].usage.drafted_tokens > 0 and got[0].usage.accepted_tokens > 0
    assert got[1].usage.accepted_tokens == got[1].usage.drafted_tokens > 0  # drafts itself


def test_rows_join_leave_and_cancel_while_others_verify(demo_engine):
    prompts = [COPY, COPY + " again", "A list of colours:", COPY[:80]]
    want = [_plain(demo_engine, p, GREEDY, {"max_tokens": 120}) for p in prompts]
    demo_engine.reset_cache()
    demo_engine.batching(max_batch=8, prefill_chunk=32)
    spec = {"max_tokens": 120, "speculative": "ngram"}
    first = demo_engine.submit(prompts[0], GREEDY, ignore_eos=True, **spec)
    doomed = demo_engine.submit(COPY, GREEDY, ignore_eos=True, **spec)
    events = iter(first)
    for _ in range(20):  # the first verifies well before the others arrive
        next(events)
    late = [
        demo_engine.submit(p, GREEDY, ignore_eos=True, **(spec if i % 2 else {"max_tokens": 120}))
        for i, p in enumerate(prompts[1:])
    ]
    for i, _ in enumerate(doomed):
        if i == 25:  # cancelled between (or inside) its verify steps
            doomed.cancel()
    for _ in events:
        pass
    assert first.result().tokens == want[0].tokens
    d = doomed.result()
    assert d.finish_reason == "cancelled" and len(d.tokens) < 120
    assert d.tokens == want[0].tokens[: len(d.tokens)]
    assert [h.result(timeout=300).tokens for h in late] == [w.tokens for w in want[1:]]
    demo_engine.reset_cache()


def test_cancel_inside_a_verify_step(demo_engine):
    """A cancellation seen while a verify step pushes its row's tokens ends that row there
    (its sink cancels it from inside the step); the other row goes on with its plain
    tokens."""
    want = _plain(demo_engine, COPY, GREEDY, {"max_tokens": 80})
    demo_engine.reset_cache()
    demo_engine.batching(max_batch=8)
    events = []
    box = {}

    def sink(item):
        events.append(item)
        if len(events) == 30:
            box["h"].cancel()

    spec = {"max_tokens": 80, "speculative": "ngram"}
    box["h"] = h = demo_engine.submit(COPY, GREEDY, ignore_eos=True, sink=sink, **spec)
    rest = demo_engine.submit(COPY, GREEDY, ignore_eos=True, max_tokens=80)
    assert rest.result(timeout=300).tokens == want.tokens
    assert h._done.wait(300) and h.completion is not None
    assert h.completion.finish_reason == "cancelled"
    assert h.completion.tokens == want.tokens[: len(h.completion.tokens)]
    assert len(h.completion.tokens) < 80
    demo_engine.reset_cache()


def test_best_width_weighs_chances_against_cost():
    # Nothing to guess, or guesses that cannot pay: plain steps.
    assert best_width([[], []], 0.3) == (1, 1.0)
    assert best_width([[0.1], []], 0.3)[0] == 1
    assert best_width([], 0.3) == (1, 1.0)
    # Copying rows: wide; the gain is tokens per row over the step's cost.
    w, gain = best_width([[0.9, 0.8, 0.7, 0.6]] * 8, 0.25)
    assert w == 5 and gain == pytest.approx((1 + 3.0) / (1 + 0.25 * 4))
    # One copying row among eight does not pay for widening all eight.
    assert best_width([[0.9, 0.8, 0.7, 0.6]] + [[]] * 7, 0.25)[0] == 1
    # A draft model's step costs too: a dear one narrows the step, then stops it.
    assert best_width([[0.9, 0.8, 0.7, 0.6]] * 8, 0.25, 0.5)[0] < 5
    assert best_width([[0.9, 0.8, 0.7, 0.6]] * 8, 0.25, 1.0)[0] == 1
    # A width measured dearer than the linear guess loses to one measured cheaper.
    assert best_width([[0.9, 0.8, 0.7, 0.6]] * 8, 0.25, measured={5: 3.0, 3: 1.3})[0] == 3
    with pytest.raises(ValueError, match=">= 0"):
        best_width([[0.5]], -0.1)


def test_chances_follow_a_rows_acceptance_by_kind():
    spec = Speculation(NgramDrafter(), 4)
    # Priors: a 3-gram's drafts are likelier than a 1-gram's (cut below MIN_CHANCE).
    assert len(spec.chances(4, 3)) > len(spec.chances(4, 1)) == 1
    for _ in range(4):
        spec.observe(4, 4, 3)  # every 3-gram draft held
    assert spec.chances(4, 3) == pytest.approx([spec.rate(3) ** t for t in range(1, 5)])
    assert spec.rate(3) == pytest.approx(MAX_RATE)  # never certain: a copy ends unannounced
    for _ in range(4):
        spec.observe(4, 0, 3)  # a copy ended: the first draft missed
    assert spec.chances(4, 3) == []
    assert spec.rate(1) == pytest.approx(NGRAM_PRIOR[0])  # other kinds keep their own


def test_drafts_and_kinds_of_prompt_lookup():
    spec = Speculation(NgramDrafter(), 3)
    assert spec.lookup([5, 6, 7, 8, 9, 5, 6, 7]) == ([8, 9, 5], 3)
    assert spec.lookup([5, 6, 7, 1, 7]) == ([1, 7], 1)
    assert spec.lookup([1, 2, 3]) == ([], 0)


def test_pacer_measures_costs_relative_to_a_plain_step():
    p = Pacer()
    assert p.plain_steps() == Pacer.MEASURE and not p.needs_plain()  # nothing measured yet
    p.record_verify(5, 0.3, drafts=2, draft_s=0.1, rows=8)  # priced once a plain step is
    assert p.per_token == Pacer.PER_TOKEN and p.steps == 1 and p.needs_plain()
    assert p.costs(8, 5) == {}
    p.record_plain(8, 0.8, rows=8)  # 0.1 s a plain step of 8 rows
    assert p.plain_s == pytest.approx(0.1) and p.steps == 9 and not p.needs_plain()
    assert p.costs(8, 5)[5] == pytest.approx(3.0)
    assert p.plain_steps() == Pacer.LOOK
    p.record_verify(5, 0.3, drafts=2, draft_s=0.1, rows=8)
    # (0.3 / 0.1 - 1) / 4 = 0.5 per token; 0.1 / 2 / 0.1 = 0.5 per draft step.
    assert p.per_token == pytest.approx(0.7 * Pacer.PER_TOKEN + 0.3 * 0.5)
    assert p.per_draft == pytest.approx(0.5) and p.draft_measured  # a measurement, no prior
    assert p.could_pay()
    p.record_verify(5, 0.3, drafts=2, draft_s=0.2, rows=8)  # then an average: 1.0 per draft
    assert p.per_draft == pytest.approx(0.7 * 0.5 + 0.3 * 1.0)
    for _ in range(20):  # a draft model as dear as the target: it can never pay
        p.record_verify(2, 0.12, drafts=1, draft_s=0.1, rows=8)
    assert not p.could_pay()
    assert p.best([[0.99]] * 8, drafting=True)[0] == 1
    assert p.best([[0.99]] * 8)[0] == 2  # prompt lookup costs no draft step


def test_a_pass_that_does_not_grow_linearly_is_priced_by_its_tokens():
    """A quantized model's matmul switches to dequantize + BLAS past a few rows: 2 tokens
    per row cost as much as 5. Each measured pass prices its own token count."""
    p = Pacer()
    p.record_plain(4, 0.4, rows=8)
    chances = [[0.9, 0.8, 0.7, 0.6]] * 8
    assert p.best(chances)[0] == 5  # nothing verified yet: the prior slope
    p.record_verify(5, 0.2, rows=8)  # twice a plain step
    assert p.costs(8, 5)[5] == pytest.approx(2.0)
    p.record_verify(2, 0.2, rows=8)  # as dear
    assert p.costs(8, 2)[2] == pytest.approx(2.0)
    assert p.best([[0.6]] * 8)[0] == 1  # one draft cannot pay for a doubled pass
    assert p.best(chances)[0] == 5


def test_pacer_prices_plain_and_verify_steps_apart():
    """Rows finish: a verify step of 2 rows is weighed against a plain step of 2 rows.
    Plain steps are priced from plain steps only (pipelined; on some models another code
    path than a multi-token pass), verify passes by their tokens, from verify passes."""
    p = Pacer()
    assert p.plain_seconds(4) is None and p.verify_seconds(4, 2) is None
    p.record_plain(4, 0.4, rows=8)  # 0.1 s
    p.record_plain(4, 0.2, rows=2)  # 0.05 s
    assert p.plain_seconds(5) == pytest.approx(0.05 + 0.05 * 3 / 6)
    assert p.plain_seconds(16) == pytest.approx(0.1)  # more rows: never dearer than measured
    assert p.plain_seconds(1) == pytest.approx(0.025)  # fewer: its share
    # No verify pass yet: the prior (+per_token of a plain step per further token per row).
    assert p.verify_seconds(8, 3) == pytest.approx(0.1 * (1 + 2 * Pacer.PER_TOKEN))
    p.record_verify(5, 0.3, rows=8)  # 40 tokens
    p.record_verify(2, 0.06, rows=4)  # 8 tokens: a verify pass, not a plain step of 8 rows
    assert p.plain_seconds(8) == pytest.approx(0.1)
    assert p.verify_seconds(4, 6) == pytest.approx(0.06 + 0.24 * 16 / 32)
    assert p.verify_seconds(8, 8) == pytest.approx(0.3 + 0.24 / 32 * 24)  # the slope past
    assert p.costs(2, 5)[5] == pytest.approx(p.verify_seconds(2, 5) / 0.05)


def test_drafts_that_never_hold_turn_off_and_try_again_rarely(demo_engine, other, fixed_costs):
    """A draft model whose drafts never hold tries one draft, rests 64 steps, tries again,
    rests 128 (a try costs a catch-up pass); a row drafting for itself speculates
    throughout. Every row's tokens are plain decoding's."""
    spec_bad = {"speculative": "draft", "draft_model": other}
    spec_good = {"speculative": "draft", "draft_model": demo_engine}
    prompts = ["Tell me a story.", "Tell me another story.", COPY]
    want = [_plain(demo_engine, p, GREEDY, {"max_tokens": 220}).tokens for p in prompts]
    demo_engine.reset_cache()
    demo_engine.batching(max_batch=8)
    handles = [
        demo_engine.submit(p, GREEDY, ignore_eos=True, max_tokens=220, **spec_bad)
        for p in prompts[:2]
    ]
    got = [h.result(timeout=300) for h in handles]
    assert [g.tokens for g in got] == want[:2]
    for g in got:
        assert 2 <= g.usage.drafted_tokens <= 3 and g.usage.accepted_tokens == 0
    good = demo_engine.submit(prompts[2], GREEDY, ignore_eos=True, max_tokens=220, **spec_good)
    g = good.result(timeout=300)
    assert g.tokens == want[2]
    assert g.usage.accepted_tokens == g.usage.drafted_tokens > 100
    demo_engine.reset_cache()


def test_a_batch_whose_drafts_cannot_pay_stops_looking(
    demo_engine, other, fixed_costs, monkeypatch
):
    """Rows whose draft model tried and, as dear as measured, could never pay do not draft
    again, so the batch stops looking at their drafts (a look drains the pipeline): a
    couple of looks in 220 steps instead of one every Pacer.LOOK. Tokens stay plain."""
    monkeypatch.setattr(Pacer, "PER_DRAFT", 2.0)  # a draft step dearer than a plain one
    looks = []
    speculate = Batch._speculate
    monkeypatch.setattr(Batch, "_speculate", lambda self: (looks.append(1), speculate(self)))
    prompts = ["Tell me a story.", "Tell me another story."]
    want = [_plain(demo_engine, p, GREEDY, {"max_tokens": 220}).tokens for p in prompts]
    demo_engine.reset_cache()
    demo_engine.batching(max_batch=8)
    spec = {"speculative": "draft", "draft_model": other}
    handles = [
        demo_engine.submit(p, GREEDY, ignore_eos=True, max_tokens=220, **spec) for p in prompts
    ]
    got = [h.result(timeout=300) for h in handles]
    assert [g.tokens for g in got] == want
    assert [g.usage.drafted_tokens for g in got] == [1, 1]  # the one try that measures it
    assert len(looks) <= 3 < 220 // Pacer.LOOK
    demo_engine.reset_cache()
