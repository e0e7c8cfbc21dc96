"""Continuous batching: the batch KV cache, the per-row sampler and the scheduler.

The reference for every batched result is the same request run alone.
"""

import subprocess
import sys
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import SamplingParams, _core
from mlx_harmony_core.errors import CapacityError, InvalidRequestError, RequestTypeError
from mlx_harmony_core.kv_cache import (
    BatchKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_batch_cache,
    make_cache,
)
from mlx_harmony_core.testing import ScriptedModel

GREEDY = SamplingParams(temperature=0.0)


def _kv(rng, t, heads=2, dim=16):
    k = mx.array(rng.normal(size=(1, heads, t, dim)).astype(np.float32))
    v = mx.array(rng.normal(size=(1, heads, t, dim)).astype(np.float32))
    return k, v


def _attend(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)


# -- the batch cache against single caches -------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: KVCache(),
        lambda: RotatingKVCache(8, 0, 4),
        lambda: RotatingKVCache(8, 0, "all"),
        lambda: QuantizedKVCache(8, 0),
    ],
    ids=["full", "window", "window-all", "quantized"],
)
def test_batch_cache_attends_like_each_row_alone(rng, make):
    """Rows of different lengths joining at different steps and leaving: every row's
    attention output equals its own single cache's, step after step, past the window."""
    singles, batch = [], make_batch_cache([make()])[0]
    order = []  # row index in the batch -> sequence id
    for step in range(40):
        if step in (0, 3, 11, 20):  # a new sequence joins, prefilled with its own cache
            c = make()
            k, v = _kv(rng, int(rng.integers(1, 30)))
            c.update_and_fetch(k, v)
            singles.append(c)
            batch.insert(c)
            order.append(len(singles) - 1)
        if step == 25:  # the second row leaves
            batch.filter([i for i in range(len(order)) if i != 1])
            order.pop(1)
        B = len(order)
        q = mx.array(rng.normal(size=(B, 4, 1, 16)).astype(np.float32))
        k = mx.array(rng.normal(size=(B, 2, 1, 16)).astype(np.float32))
        v = mx.array(rng.normal(size=(B, 2, 1, 16)).astype(np.float32))
        mask = batch.make_mask(1, return_array=True)
        assert batch.offset.tolist() == [singles[s].offset for s in order]
        kb, vb = batch.update_and_fetch(k, v)
        out = _attend(q, kb, vb, mask)
        for row, s in enumerate(order):
            ks, vs = singles[s].update_and_fetch(k[row : row + 1], v[row : row + 1])
            m1 = singles[s].make_mask(1, return_array=True)  # after: not needed for N=1
            del m1
            ref = _attend(q[row : row + 1], ks, vs, None)
            assert mx.abs(out[row : row + 1] - ref).max().item() < 1e-5, (step, row)
    # a row taken out holds what its single cache holds, and keeps decoding the same
    for row, s in enumerate(order):
        got = batch.extract(row)
        assert got.kind == singles[s].kind and got.offset == singles[s].offset
        for a, b in zip(got.state, singles[s].state, strict=True):
            assert a.shape == b.shape and mx.array_equal(a, b).item()


def test_batch_cache_trim_rewinds_every_row(rng):
    singles = [KVCache() for _ in range(3)]
    batch = BatchKVCache()
    for n, c in zip((5, 9, 2), singles, strict=True):
        c.update_and_fetch(*_kv(rng, n))
        batch.insert(c)
    k = mx.array(rng.normal(size=(3, 2, 1, 16)).astype(np.float32))
    batch.update_and_fetch(k, k)
    assert batch.trimmable() == 3 and batch.trim(1) == 1
    assert batch.positions == [5, 9, 2]
    assert batch.trim(10) == 2  # the shortest row bounds it


def test_batch_cache_bad_input():
    batch = BatchKVCache()
    with pytest.raises(ValueError, match="no rows"):
        batch.update_and_fetch(mx.zeros((1, 2, 1, 16)), mx.zeros((1, 2, 1, 16)))
    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 2, 3, 16)), mx.zeros((1, 2, 3, 16)))
    batch.insert(c)
    with pytest.raises(ValueError, match="rows but the batch has 1"):
        batch.update_and_fetch(mx.zeros((2, 2, 1, 16)), mx.zeros((2, 2, 1, 16)))
    with pytest.raises(ValueError, match="cannot join"):
        batch.insert(RotatingKVCache(8))
    with pytest.raises(ValueError, match="kv_heads or head_dim"):
        other = KVCache()
        other.update_and_fetch(mx.zeros((1, 4, 3, 16)), mx.zeros((1, 4, 3, 16)))
        batch.insert(other)
    with pytest.raises(ValueError, match="distinct row indices"):
        batch.filter([0, 0])
    with pytest.raises(ValueError, match="no row 3"):
        batch.extract(3)
    with pytest.raises(ValueError, match="window"):
        BatchKVCache(8, 0).insert(_window_row(4))
    with pytest.raises(ValueError, match="quantized KV is for full-attention"):
        BatchKVCache(8, 0, 8)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        BatchKVCache(0, -1, 3)


def _window_row(size):
    c = RotatingKVCache(size)
    c.update_and_fetch(mx.zeros((1, 2, 2, 16)), mx.zeros((1, 2, 2, 16)))
    return c


def test_make_batch_cache_follows_the_model(demo_engine):
    template = make_cache(demo_engine.model, kv_bits=8)
    batch = make_batch_cache(template)
    assert [b.window for b in batch] == [
        c.max_size if isinstance(c, RotatingKVCache) else 0 for c in template
    ]
    assert any(b.kv_bits == 8 for b in batch)
    assert make_batch_cache([RotatingKVCache(8, 2)]) is None  # attention sinks: not batched
    assert make_batch_cache([object()]) is None


# -- the per-row sampler -------------------------------------------------------------------


def _random_options(rng, i, vocab):
    o = _core.SamplingOptions()
    o.seed = int(rng.integers(0, 2**62))
    o.counter = int(rng.integers(0, 1000))
    kind = i % 6
    o.temperature = [0.0, 0.7, 1.0, 1.3, 0.9, 1.1][kind]
    o.top_k = [0, 40, 0, 0, 10, 0][kind]
    o.top_p = [1.0, 0.9, 1.0, 0.5, 1.0, 0.95][kind]
    o.min_p = [0.0, 0.0, 0.05, 0.0, 0.0, 0.1][kind]
    o.xtc_probability = [0.0, 0.0, 0.0, 0.5, 0.0, 1.0][kind]
    o.repetition_penalty = [1.0, 1.3, 1.0, 1.0, 0.8, 1.0][kind]
    o.presence_penalty = [0.0, 0.0, 0.5, 0.0, 0.0, -0.3][kind]
    o.frequency_penalty = [0.0, 0.0, 0.2, 0.0, 0.0, 0.0][kind]
    o.repetition_context_size = [0, 5, 16, 3, 16, 8][kind]
    o.logprobs = [-1, 3, -1, 0, 5, -1][kind]
    return o


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "mlx-ops"])
def test_sample_rows_equals_each_row_alone(rng, kernel):
    """Each row with its own options, bias, window and mask draws exactly what a call of
    its own draws, wherever it sits in the batch."""
    V, B, W = 3000, 6, 16
    for trial in range(20):
        logits = mx.array((rng.normal(size=(B, V)) * 2).astype(np.float32))
        hist = mx.array(rng.integers(-1, V, size=(B, W)).astype(np.int32))
        opts = [_random_options(rng, i + trial, V) for i in range(B)]
        bias = [
            {int(t): float(rng.normal() * 3) for t in rng.integers(0, V, size=i % 3)}
            for i in range(B)
        ]
        ids_, vals, offsets = [], [], [0]
        for b in bias:
            ids_ += list(b)
            vals += list(b.values())
            offsets.append(len(ids_))
        masks = np.ones((B, V), bool)
        masks[1, rng.integers(0, V, size=V // 2)] = False
        packed = mx.array(mhc.pack_mask(masks))
        outs = _core.sample_rows(
            logits,
            hist,
            mx.array(ids_, dtype=mx.int32),
            mx.array(vals, dtype=mx.float32),
            mx.array(offsets, dtype=mx.int32),
            opts,
            mask=packed,
            kernel=kernel,
        )
        for b in range(B):
            o = opts[b]
            w = o.repetition_context_size or W
            alone = _core.sample(
                logits[b],
                hist[b, W - w :],
                mx.array(list(bias[b]), dtype=mx.int32),
                mx.array(list(bias[b].values()), dtype=mx.float32),
                o,
                mask=packed[b],
                kernel=kernel,
            )
            assert outs[0][b].item() == alone[0].item(), (trial, b)
            if o.logprobs >= 0:
                k = o.logprobs
                assert abs(outs[1][b].item() - alone[1].item()) < 1e-5
                assert outs[2][b, :k].tolist() == alone[2].tolist()


def test_sample_rows_bad_input():
    logits = mx.zeros((2, 10))
    o = _core.SamplingOptions()
    with pytest.raises(ValueError, match="one SamplingOptions per logits row"):
        _core.sample_rows(logits, None, None, None, None, [o])
    with pytest.raises(ValueError, match="bias_offsets"):
        _core.sample_rows(logits, None, None, None, mx.zeros((2,), dtype=mx.int32), [o, o])
    with pytest.raises(ValueError, match="shape \\(B, V\\)"):
        _core.sample_rows(mx.zeros((10,)), None, None, None, None, [o])
    bad = _core.SamplingOptions()
    bad.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        _core.sample_rows(logits, None, None, None, None, [o, bad])


def test_draws_survive_float_rounding(rng):
    """The draw is a race keyed by token id: logits that differ by float rounding (as a
    batch of another size computes them) draw the same token."""
    V = 201088
    same = 0
    for trial in range(200):
        x = rng.normal(size=V).astype(np.float32)  # flat: the worst case for an inverse CDF
        noisy = (x + rng.normal(size=V).astype(np.float32) * 5e-6).astype(np.float32)
        o = _core.SamplingOptions()
        o.seed, o.counter = 7, trial
        a = _core.sample(mx.array(x), options=o)[0].item()
        b = _core.sample(mx.array(noisy), options=o)[0].item()
        same += a == b
    assert same >= 199


# -- the scheduler: each request as if it ran alone ----------------------------------------


def _prompts(n):
    words = ["cats", "the sea", "rain", "x", "a long story about nothing", "bees", "ok", "sun"]
    return [
        [{"role": "user", "content": f"Tell me about {words[i % 8]}. " * (1 + 3 * i)}]
        for i in range(n)
    ]


def _alone(engine, prompts, params, max_tokens, **kw):
    out = []
    for p, pp, n in zip(prompts, params, max_tokens, strict=True):
        engine.reset_cache()
        out.append(engine.generate(p, pp, max_tokens=n, ignore_eos=True, **kw))
    engine.reset_cache()
    return out


LENGTHS = [300, 40, 170, 5, 330, 90, 1, 250]


@pytest.fixture(scope="module")
def greedy_alone(demo_engine):
    return _alone(demo_engine, _prompts(8), [GREEDY] * 8, LENGTHS)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_batches_equal_single_runs(demo_engine, greedy_alone, batch):
    """Mixed prompt lengths and reply lengths, rows joining as prefills finish and leaving
    as they end, through 300+ steps past the demo's 128-token sliding window."""
    demo_engine.batching(max_batch=batch, prefill_chunk=32)
    got = demo_engine.generate_batch(
        [{"messages": p, "max_tokens": m} for p, m in zip(_prompts(8), LENGTHS, strict=True)],
        GREEDY,
        ignore_eos=True,
    )
    demo_engine.reset_cache()
    for a, b in zip(greedy_alone, got, strict=True):
        assert b.tokens == a.tokens
        assert b.finish_reason == a.finish_reason == "length"
        assert b.usage.completion_tokens == len(a.tokens)


def test_logits_equal_single_runs_within_1e4(demo_engine):
    """The logits each row sees (read through a logits processor) match the single run's."""

    def recorder(store):
        def fn(tokens, logits):
            store.append(np.array(logits.astype(mx.float32)).reshape(-1))
            return logits

        return fn

    prompts = _prompts(3)
    alone = []
    for p in prompts:
        seen: list = []
        demo_engine.reset_cache()
        demo_engine.generate(
            p, GREEDY, max_tokens=130, ignore_eos=True, logits_processors=[recorder(seen)]
        )
        alone.append(seen)
    demo_engine.reset_cache()
    together = [[] for _ in prompts]
    demo_engine.batching(max_batch=4)
    demo_engine.generate_batch(
        [
            {"messages": p, "logits_processors": [recorder(s)]}
            for p, s in zip(prompts, together, strict=True)
        ],
        GREEDY,
        max_tokens=130,
        ignore_eos=True,
    )
    demo_engine.reset_cache()
    for a, b in zip(alone, together, strict=True):
        assert len(a) == len(b) == 130
        assert max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) < 1e-4


def test_seeded_sampling_equals_single_runs(demo_engine):
    """Every control on, each request with its own seed: the same tokens (and logprobs)
    as alone, whatever row it takes and whoever runs beside it."""
    prompts = _prompts(6)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.0, top_k=40, min_p=0.05, seed=2, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, seed=3, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=1.1, xtc_probability=0.5, xtc_threshold=0.1, seed=4),
        SamplingParams(temperature=0.9, seed=5, logit_bias={11: 5.0, 12: -100.0}),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, repetition_context_size=8),
    ]
    lengths = [120, 60, 150, 90, 40, 130]
    ref = []
    for p, pp, n in zip(prompts, params, lengths, strict=True):
        demo_engine.reset_cache()
        ref.append(demo_engine.generate(p, pp, max_tokens=n, ignore_eos=True, logprobs=2))
    demo_engine.reset_cache()
    demo_engine.batching(max_batch=6, prefill_chunk=16)
    got = demo_engine.generate_batch(
        [
            {"messages": p, "params": pp, "max_tokens": n}
            for p, pp, n in zip(prompts, params, lengths, strict=True)
        ],
        ignore_eos=True,
        logprobs=2,
    )
    demo_engine.reset_cache()
    for a, b in zip(ref, got, strict=True):
        assert b.tokens == a.tokens
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_quantized_kv_batches(demo_engine):
    engine = mhc.Engine(
        demo_engine.model, chat_format=demo_engine.chat_format, cache_options={"kv_bits": 8}
    )
    prompts = _prompts(3)
    ref = _alone(engine, prompts, [GREEDY] * 3, [150] * 3)
    got = engine.generate_batch(prompts, GREEDY, max_tokens=150, ignore_eos=True)
    assert [c.tokens for c in got] == [c.tokens for c in ref]


def test_stop_strings_tokens_masks_and_processors_in_a_batch(demo_engine):
    prompts = _prompts(4)
    ref = _alone(demo_engine, prompts, [GREEDY] * 4, [60] * 4)
    stop_text = ref[1].text[10:14]
    banned = ref[2].tokens[3]
    allowed = np.ones(demo_engine.vocab_size, bool)
    allowed[banned] = False
    mask = mhc.pack_mask(allowed)
    seen_masks = []

    def token_mask(reply):
        seen_masks.append(len(reply))
        return mask

    demo_engine.batching(max_batch=4)
    handles = [
        demo_engine.submit(prompts[0], GREEDY, max_tokens=60, ignore_eos=True),
        demo_engine.submit(prompts[1], GREEDY, max_tokens=60, ignore_eos=True, stop=[stop_text]),
        demo_engine.submit(
            prompts[2], GREEDY, max_tokens=60, ignore_eos=True, token_mask=token_mask
        ),
        demo_engine.submit(
            prompts[3],
            GREEDY,
            max_tokens=60,
            ignore_eos=True,
            logits_processors=[lambda t, x: x],
        ),
    ]
    got = [h.result(timeout=120) for h in handles]
    demo_engine.reset_cache()
    assert got[0].tokens == ref[0].tokens and got[3].tokens == ref[3].tokens
    assert got[1].finish_reason == "stop" and stop_text not in got[1].text
    assert ref[1].text.startswith(got[1].text)
    assert banned not in got[2].tokens and got[2].tokens[:3] == ref[2].tokens[:3]
    assert seen_masks[:3] == [0, 1, 2]


def test_requests_join_while_others_decode_and_cancel_alone(demo_engine):
    prompts = _prompts(4)
    ref = _alone(demo_engine, prompts, [GREEDY] * 4, [120] * 4)
    demo_engine.batching(max_batch=8)
    first = demo_engine.submit(prompts[0], GREEDY, max_tokens=120, ignore_eos=True)
    doomed = demo_engine.submit(prompts[1], GREEDY, max_tokens=120, ignore_eos=True)
    events = iter(first)
    for _ in range(30):  # the first is well under way before the others arrive
        next(events)
    late = [demo_engine.submit(p, GREEDY, max_tokens=120, ignore_eos=True) for p in prompts[2:]]
    for i, _ in enumerate(doomed):
        if i == 20:
            doomed.cancel()
    for _ in events:
        pass
    assert first.result().tokens == ref[0].tokens
    assert doomed.result().finish_reason == "cancelled" and len(doomed.result().tokens) < 120
    assert [h.result(timeout=120).tokens for h in late] == [c.tokens for c in ref[2:]]
    demo_engine.reset_cache()


def test_prefix_cache_reuse_with_batching(demo_engine):
    engine = mhc.Engine(
        demo_engine.model, chat_format=demo_engine.chat_format, prefix_cache_entries=16
    )
    convs = _prompts(3)
    first = engine.generate_batch(convs, GREEDY, max_tokens=20, ignore_eos=True)
    follow = [
        [*c, {"role": "assistant", "content": r.text}, {"role": "user", "content": "more"}]
        for c, r in zip(convs, first, strict=True)
    ]
    second = engine.generate_batch(follow, GREEDY, max_tokens=20, ignore_eos=True)
    assert all(c.usage.cached_prompt_tokens > 0 for c in second)
    fresh = mhc.Engine(demo_engine.model, chat_format=demo_engine.chat_format, reuse_cache=False)
    assert [c.tokens for c in second] == [
        fresh.generate(f, GREEDY, max_tokens=20, ignore_eos=True).tokens for f in follow
    ]


def test_kv_budget_and_queue_limits(demo_engine):
    engine = mhc.Engine(demo_engine.model, chat_format=demo_engine.chat_format)
    sched = engine.batching(max_batch=8, kv_budget_bytes=2 * 2 * engine.batching().kv_need(400))
    # the budget fits two requests of ~400 tokens at a time (x2 for capacity growth)
    with pytest.raises(CapacityError, match="more than the budget") as err:
        engine.submit(_prompts(1)[0], max_tokens=5000)
    assert err.value.code == "kv_budget"
    running = []
    peak = [0]
    original = sched._batch._update_rows

    def watch(*a, **k):
        original(*a, **k)
        peak[0] = max(peak[0], len(sched._batch.rows))

    sched._batch._update_rows = watch
    running = [engine.submit(p, GREEDY, max_tokens=300, ignore_eos=True) for p in _prompts(3)]
    assert all(h.result(timeout=300).finish_reason == "length" for h in running)
    assert peak[0] == 2
    limited = engine.batching(max_batch=1, max_queue=1)
    a = engine.submit("one", max_tokens=300, ignore_eos=True)
    b = engine.submit("two", max_tokens=5, ignore_eos=True)
    with pytest.raises(CapacityError) as err:
        engine.submit("three", max_tokens=5)
    assert err.value.code == "queue_full"
    a.cancel()
    assert a.result(timeout=60).finish_reason == "cancelled" and b.result(timeout=60)
    assert limited.pending == 0


def test_one_failing_row_leaves_the_others_running(demo_engine):
    prompts = _prompts(3)
    ref = _alone(demo_engine, prompts, [GREEDY] * 3, [40] * 3)

    def poison(tokens, logits):
        return logits if tokens.size < len(mhc.render_prompt(prompts[1])) + 10 else logits * mx.nan

    demo_engine.batching(max_batch=3)
    hs = [
        demo_engine.submit(prompts[0], GREEDY, max_tokens=40, ignore_eos=True),
        demo_engine.submit(
            prompts[1], GREEDY, max_tokens=40, ignore_eos=True, logits_processors=[poison]
        ),
        demo_engine.submit(prompts[2], GREEDY, max_tokens=40, ignore_eos=True),
    ]
    assert hs[0].result(timeout=60).tokens == ref[0].tokens
    with pytest.raises(ValueError, match="NaN"):
        hs[1].result(timeout=60)
    assert hs[2].result(timeout=60).tokens == ref[2].tokens
    demo_engine.reset_cache()


class _Flaky(ScriptedModel):
    """Raises on its second call."""

    def __init__(self) -> None:
        super().__init__([1, 2, 3], 0)
        self.n = 0

    def __call__(self, inputs, cache=None):
        self.n += 1
        if self.n == 2:
            raise RuntimeError("the model broke")
        return super().__call__(inputs, cache)


def test_a_broken_forward_pass_fails_its_batch_and_the_next_runs(encoding):
    engine = mhc.Engine(_Flaky(), encoding=encoding)
    bad = engine.submit("hi", GREEDY, max_tokens=5)
    with pytest.raises(RuntimeError, match="the model broke"):
        bad.result(timeout=30)
    assert engine.submit("hi", GREEDY, max_tokens=3).result(timeout=30).finish_reason == "length"


def test_generate_batch_checks_every_item_first(demo_engine):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        demo_engine.generate_batch(["ok", {"messages": "bad", "max_tokens": 0}])
    with pytest.raises(RequestTypeError, match="without 'messages'"):
        demo_engine.generate_batch([{"prompt": "x"}])
    with pytest.raises(RequestTypeError, match="did you mean"):
        demo_engine.generate_batch(["x"], max_tokenz=3)
    with pytest.raises(ValueError, match="max_batch"):
        demo_engine.batching(max_batch=0)
    ids = demo_engine.render("hello")
    out = demo_engine.generate_batch([ids, "hello"], GREEDY, max_tokens=4, ignore_eos=True)
    assert out[0].tokens == out[1].tokens


def test_exit_while_requests_run_is_clean(tmp_path):
    """A script that exits with requests still decoding exits cleanly (no abort from a
    thread inside MLX at interpreter teardown)."""
    code = (
        "import mlx_harmony_core as mhc\n"
        "e = mhc.load('demo')\n"
        "hs = [e.submit('hi', max_tokens=100000, ignore_eos=True) for _ in range(3)]\n"
        "next(iter(hs[0]))\n"
        "e.generate('solo', max_tokens=3)\n"
        "print('bye')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "bye" in r.stdout, r.stderr
    assert "terminate called" not in r.stderr


def test_handle_is_thread_safe(demo_engine):
    results = {}

    def client(i):
        results[i] = demo_engine.submit(
            _prompts(8)[i], GREEDY, max_tokens=30, ignore_eos=True
        ).result(timeout=120)

    demo_engine.batching(max_batch=8)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    demo_engine.reset_cache()
    ref = _alone(demo_engine, _prompts(8), [GREEDY] * 8, [30] * 8)
    assert [results[i].tokens for i in range(8)] == [c.tokens for c in ref]


def test_a_failing_sink_cancels_its_request_only(demo_engine):
    """A consumer that is gone (its sink raises, as a closed event loop does) stops its own
    request; the scheduler keeps serving."""
    demo_engine.batching(max_batch=4)

    def broken(item):
        raise RuntimeError("event loop is closed")

    gone = demo_engine.submit("hi", GREEDY, max_tokens=500, ignore_eos=True, sink=broken)
    ok = demo_engine.submit("ho", GREEDY, max_tokens=20, ignore_eos=True)
    assert ok.result(timeout=60).finish_reason == "length"
    deadline = time.monotonic() + 30
    while not gone.done:  # its first event failed to arrive: it stops at the next token
        assert time.monotonic() < deadline, "the request of a gone consumer kept running"
        time.sleep(0.05)
    assert gone.cancelled
    assert gone.completion is not None and gone.completion.finish_reason == "cancelled"
    assert len(gone.completion.tokens) < 500
