"""C++ KV caches: equal to mlx-lm's, rewindable after the window wraps, persistent, quantized."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlx_harmony_core as mhc
from mlx_harmony_core.kv_cache import (
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_cache,
    make_cache,
    save_cache,
)


@pytest.fixture(scope="module")
def model(demo_engine):
    return demo_engine.model


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    # head_dim 64: quantized KV needs a multiple of the group size
    path = mhc.make_test_model(
        tmp_path_factory.mktemp("m") / "hd64",
        layers=4,
        hidden_size=64,
        heads=2,
        kv_heads=1,
        head_dim=64,
        experts=2,
        experts_per_token=1,
    )
    return mhc.load(path).model


def tokens(batch, n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 199990, size=(batch, n)))


def run(model, toks, cache, chunks, steps):
    """Prefill in `chunks`, then single-token steps; returns every logits output."""
    out, pos = [], 0
    for c in chunks:
        out.append(model(toks[:, pos : pos + c], cache=cache))
        pos += c
    for _ in range(steps):
        out.append(model(toks[:, pos : pos + 1], cache=cache))
        pos += 1
    return out


@pytest.mark.parametrize("batch, steps", [(1, 120), (2, 310)])
def test_logits_equal_mlx_lm_caches(model, batch, steps):
    toks = tokens(batch, 600)
    ours = run(model, toks, make_cache(model), [64, 64, 100], steps)
    theirs = run(model, toks, make_prompt_cache(model), [64, 64, 100], steps)
    diff = max(float(mx.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
    assert diff < 1e-4


def test_cache_types_for_gpt_oss(model, model64):
    caches = make_cache(model)
    assert [type(c) for c in caches] == [RotatingKVCache, KVCache]
    assert caches[0].max_size == 128
    q = make_cache(model64, kv_bits=8)
    assert [type(c) for c in q] == [RotatingKVCache, QuantizedKVCache] * 2


def test_other_mlx_lm_models_get_our_caches():
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=100,
        num_key_value_heads=2,
    )
    m = llama.Model(args)
    caches = make_cache(m)
    assert all(isinstance(c, KVCache) for c in caches)
    toks = mx.array([[1, 2, 3, 4, 5]])
    a = m(toks, cache=caches)
    b = m(toks, cache=make_prompt_cache(m))
    assert float(mx.abs(a - b).max()) < 1e-5


@pytest.mark.parametrize("history", [300, "all"])
def test_rewind_after_the_window_wraps(model, history):
    toks = tokens(1, 700, seed=3)
    cache = make_cache(model, history=history)
    run(model, toks, cache, [200], 250)  # offset 450, far past the 128 window
    assert all(c.trimmable() >= 200 for c in cache)
    assert [c.trim(200) for c in cache] == [200, 200]  # back to 250
    ours = run(model, toks[:, 250:], cache, [3], 40)
    fresh_cache = make_prompt_cache(model)
    run(model, toks, fresh_cache, [250], 0)
    fresh = run(model, toks[:, 250:], fresh_cache, [3], 40)
    assert max(float(mx.abs(a - b).max()) for a, b in zip(ours, fresh, strict=True)) < 1e-4


def test_trim_beyond_kept_history_says_so():
    # History is dropped only when the buffer must grow (past 256 rows here).
    c = RotatingKVCache(8, 0, "window")
    for i in range(300):
        c.update_and_fetch(mx.zeros((1, 1, 1, 4)) + i, mx.zeros((1, 1, 1, 4)))
    can = c.trimmable()
    assert c.start > 0 and can == 300 - (c.start + 8 - 1)  # the window of the new end stays
    assert c.trim(can + 10) == can  # it trims what it can and reports the shortfall
    assert c.offset == 300 - can and c.trimmable() == 0


def test_amortized_growth_and_cheap_copy():
    c = KVCache()
    sizes = set()
    for i in range(1000):
        c.update_and_fetch(mx.ones((1, 2, 1, 8)) * i, mx.ones((1, 2, 1, 8)))
        sizes.add(c.nbytes)
    assert len(sizes) <= 4  # 256, 512, 1024 rows: capacity doubles, no copy per step
    d = c.copy()
    d.update_and_fetch(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 1, 8)))
    assert c.offset == 1000 and d.offset == 1001
    k, _ = c.update_and_fetch(mx.full((1, 2, 1, 8), 7.0), mx.zeros((1, 2, 1, 8)))
    assert float(k[0, 0, 999, 0]) == 999 and float(k[0, 0, 1000, 0]) == 7.0


def test_engine_multi_turn_reuse(demo_engine):
    class Counting:
        def __init__(self, m):
            self.m, self.lengths = m, []

        def __getattr__(self, name):
            return getattr(self.m, name)

        def __call__(self, x, cache=None):
            self.lengths.append(x.shape[1])
            return self.m(x, cache=cache)

    p = mhc.SamplingParams(temperature=0.0)
    turn1 = [{"role": "user", "content": "Hello there, tell me about caches."}]
    counting = Counting(demo_engine.model)
    engine = mhc.Engine(
        counting, encoding=demo_engine.encoding, config=demo_engine.config, prefill_step_size=64
    )
    c1 = engine.generate(turn1, p, max_tokens=160)  # past the sliding window
    turn2 = turn1 + [
        {"role": "assistant", "content": c1.text or "ok"},
        {"role": "user", "content": "And then?"},
    ]
    counting.lengths.clear()
    c2 = engine.generate(turn2, p, max_tokens=20)
    prompt2 = engine.render(turn2)
    assert c2.usage.cached_prompt_tokens > 0
    prefilled = sum(n for n in counting.lengths[:-19] if n > 0)
    assert prefilled == len(prompt2) - c2.usage.cached_prompt_tokens  # only the new tokens
    fresh = mhc.Engine(
        demo_engine.model,
        encoding=demo_engine.encoding,
        config=demo_engine.config,
        reuse_cache=False,
    )
    assert fresh.generate(turn2, p, max_tokens=20).tokens == c2.tokens


def test_save_load_continue(model, tmp_path):
    toks = tokens(1, 400, seed=5)
    cache = make_cache(model)
    run(model, toks, cache, [150], 60)
    save_cache(tmp_path / "c.safetensors", cache, {"note": "hi"}, model=model)
    loaded, meta = load_cache(tmp_path / "c.safetensors", model=model)
    assert meta == {"note": "hi"}
    a = run(model, toks[:, 210:], cache, [5], 30)
    b = run(model, toks[:, 210:], loaded, [5], 30)
    assert max(float(mx.abs(x - y).max()) for x, y in zip(a, b, strict=True)) == 0.0


def test_load_refuses_foreign_and_corrupted_files(model, model64, tmp_path):
    cache = make_cache(model)
    run(model, tokens(1, 50), cache, [50], 0)
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, model=model)
    with pytest.raises(ValueError, match="another model"):
        load_cache(path, model=model64)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_cache(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="corrupted|not a readable"):
        load_cache(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_cache(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("bits, mean_tol, agree", [(8, 0.01, 1.0), (4, 0.1, 0.9)])
def test_quantized_cache_accuracy_and_memory(model64, bits, mean_tol, agree):
    toks = tokens(1, 300, seed=9)
    last = lambda outs: mx.concatenate([o[:, -1] for o in outs])  # noqa: E731
    full = last(run(model64, toks, make_cache(model64), [100], 200))
    qcache = make_cache(model64, kv_bits=bits)
    quant = last(run(model64, toks, qcache, [100], 200))
    assert float(mx.abs(full - quant).mean()) < mean_tol
    assert float((mx.argmax(full, -1) == mx.argmax(quant, -1)).mean()) >= agree
    q = [c for c in qcache if isinstance(c, QuantizedKVCache)][0]
    f = KVCache()
    k = mx.random.normal((1, 1, q.offset, 64))  # the same tokens, kept in float32
    f.update_and_fetch(k, k)
    assert q.nbytes <= f.nbytes * (0.29 if bits == 8 else 0.16)


@pytest.mark.parametrize(
    "k, v, message",
    [
        (mx.zeros((1, 4, 8)), mx.zeros((1, 4, 8)), "batch, kv_heads"),
        (mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 3, 8)), "disagree"),
    ],
)
def test_bad_updates(k, v, message):
    with pytest.raises(ValueError, match=message):
        KVCache().update_and_fetch(k, v)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        RotatingKVCache(0)
    with pytest.raises(ValueError):
        RotatingKVCache(8, 8)
    with pytest.raises(ValueError):
        RotatingKVCache(8, 0, "forever")
    with pytest.raises(ValueError):
        QuantizedKVCache(3)
    c = QuantizedKVCache(8, 64)
    with pytest.raises(ValueError, match="group_size"):
        c.update_and_fetch(mx.zeros((1, 1, 1, 16)), mx.zeros((1, 1, 1, 16)))
    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 1, 1, 16)), mx.zeros((1, 1, 1, 16)))
    with pytest.raises(ValueError, match="fresh cache"):
        c.update_and_fetch(mx.zeros((1, 2, 1, 16)), mx.zeros((1, 2, 1, 16)))


@pytest.mark.parametrize("keep", [0, 3])
def test_rotating_mask_matches_reference_attention(keep):
    # Attention through our cache equals attention over all keys with the reference mask.
    rng = np.random.default_rng(0)
    W, D = 8, 4
    c = RotatingKVCache(W, keep, "window")
    allk, allv, pos = [], [], 0
    for L in [5, 1, 1, 6, 1, 9, 1, 1, 3]:
        q = mx.array(rng.normal(size=(1, 1, L, D)).astype(np.float32))
        k = mx.array(rng.normal(size=(1, 1, L, D)).astype(np.float32))
        v = mx.array(rng.normal(size=(1, 1, L, D)).astype(np.float32))
        mask = c.make_mask(L, window_size=W)
        K, V = c.update_and_fetch(k, v)
        ours = mx.fast.scaled_dot_product_attention(q, K, V, scale=1.0, mask=mask)
        allk.append(k)
        allv.append(v)
        Ka, Va = mx.concatenate(allk, 2), mx.concatenate(allv, 2)
        qp = np.arange(pos, pos + L)[:, None]
        kp = np.arange(pos + L)[None]
        ref_mask = (kp <= qp) & ((kp < keep) | (qp - kp < W - keep))
        ref = mx.fast.scaled_dot_product_attention(q, Ka, Va, scale=1.0, mask=mx.array(ref_mask))
        np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-5)
        pos += L
