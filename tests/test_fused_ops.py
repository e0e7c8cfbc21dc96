"""The fused CPU primitives (RMSNorm, RoPE, attention, SwiGLU) against MLX's own ops and a slow
numpy reference: values within float32 rounding, edge cases, bad input, transforms."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_harmony_core import _core

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
TOL = {mx.float32: 2e-5, mx.bfloat16: 2e-2, mx.float16: 2e-3}


def close(a: mx.array, b: mx.array, dtype=mx.float32, tol: float | None = None) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    tol = tol or TOL[dtype]
    np.testing.assert_allclose(
        np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), rtol=tol, atol=tol
    )


def rand(rng, shape, dtype=mx.float32):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


# ---- RMSNorm ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 5, 64), (7,), (3, 1, 4, 100)])
def test_rms_norm_matches_mlx(rng, dtype, shape):
    x = rand(rng, shape, dtype)
    w = rand(rng, shape[-1:], dtype)
    close(_core.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5), dtype)
    close(_core.rms_norm(x, None, 1e-6), mx.fast.rms_norm(x, None, 1e-6), dtype)


def test_rms_norm_numpy_reference_and_strided_input(rng):
    x = rand(rng, (6, 3, 32)).transpose(1, 0, 2)  # not row-contiguous
    w = rand(rng, (32,))
    xn = np.array(x).astype(np.float64)
    ref = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5) * np.array(w)
    np.testing.assert_allclose(np.array(_core.rms_norm(x, w, 1e-5)), ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_mixed_dtypes_and_zero_rows():
    x = mx.zeros((2, 8), dtype=mx.bfloat16)
    w = mx.ones((8,), dtype=mx.float32)
    out = _core.rms_norm(x, w, 1e-5)
    assert out.dtype == mx.float32  # result_type(x, w), as MLX's
    assert not np.isnan(np.array(out)).any()
    close(out, mx.fast.rms_norm(x, w, 1e-5))


def test_rms_norm_bad_input():
    with pytest.raises(ValueError):
        _core.rms_norm(mx.ones((2, 8)), mx.ones((7,)), 1e-5)
    with pytest.raises(ValueError):
        _core.rms_norm(mx.array(1.0), None, 1e-5)


def test_rms_norm_grad_matches_mlx(rng):
    x, w = rand(rng, (3, 16)), rand(rng, (16,))

    def f(op):
        return mx.grad(lambda x, w: op(x, w, 1e-5).sum(), argnums=(0, 1))(x, w)

    for a, b in zip(f(_core.rms_norm), f(mx.fast.rms_norm), strict=True):
        close(a, b)


# ---- RoPE -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [64, 32])
def test_rope_matches_mlx(rng, dtype, traditional, dims):
    x = rand(rng, (2, 5, 3, 64), dtype).transpose(0, 2, 1, 3)  # (B, H, T, D), strided
    for offset in (0, 17, mx.array(300)):
        kw = dict(traditional=traditional, base=10000.0, scale=1.0, offset=offset)
        # sin/cos of angles ~300 differ by the angle's float32 rounding (~3e-5) between libms
        tol = max(TOL[dtype], 1e-4)
        close(_core.rope(x, dims, **kw), mx.fast.rope(x, dims, **kw), dtype, tol)
    kw = dict(traditional=traditional, base=500000.0, scale=0.5, offset=3)
    close(_core.rope(x, dims, **kw), mx.fast.rope(x, dims, **kw), dtype)


def test_rope_freqs_vector_offsets_and_3d(rng):
    x = rand(rng, (3, 2, 4, 16))
    freqs = mx.array(np.linspace(1.0, 900.0, 8).astype(np.float32))
    off = mx.array([0, 5, 1000])
    kw = dict(traditional=False, base=None, scale=1.0, offset=off, freqs=freqs)
    close(_core.rope(x, 16, **kw), mx.fast.rope(x, 16, **kw), tol=2e-4)
    x3 = rand(rng, (2, 7, 16))
    kw = dict(traditional=False, base=10000.0, scale=1.0, offset=4)
    close(_core.rope(x3, 16, **kw), mx.fast.rope(x3, 16, **kw))


def test_rope_numpy_reference(rng):
    x = rand(rng, (1, 1, 3, 8))
    out = np.array(_core.rope(x, 8, traditional=False, base=10000.0, scale=1.0, offset=2))
    xn = np.array(x)[0, 0].astype(np.float64)
    inv = 10000.0 ** (-np.arange(4) / 4)
    theta = (np.arange(3)[:, None] + 2) * inv
    c, s = np.cos(theta), np.sin(theta)
    ref = np.concatenate([xn[:, :4] * c - xn[:, 4:] * s, xn[:, :4] * s + xn[:, 4:] * c], -1)
    np.testing.assert_allclose(out[0, 0], ref, rtol=1e-5, atol=1e-5)


def test_rope_bad_input():
    with pytest.raises(ValueError):
        _core.rope(mx.ones((1, 1, 2, 8)), 7, traditional=False, base=1e4, scale=1.0, offset=0)
    with pytest.raises(ValueError):
        _core.rope(mx.ones((1, 1, 2, 8)), 16, traditional=False, base=1e4, scale=1.0, offset=0)
    with pytest.raises(ValueError):
        _core.rope(mx.ones((2, 8)), 8, traditional=False, base=1e4, scale=1.0, offset=0)


# ---- attention --------------------------------------------------------------


def sdpa_numpy(q, k, v, scale, mask=None, sinks=None):
    """Slow obvious attention in float64: (B, Hq, Lq, D) over (B, Hk, Lk, D)."""
    q, k, v = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    if isinstance(mask, str):
        lq, lk = s.shape[-2:]
        keep = np.arange(lk)[None] <= np.arange(lq)[:, None] + lk - lq
        s = np.where(keep, s, -np.inf)
    elif mask is not None:
        m = np.array(mask)
        s = np.where(m, s, -np.inf) if m.dtype == bool else s + m
    if sinks is not None:
        sk = np.broadcast_to(np.array(sinks)[None, :, None, None], s.shape[:-1] + (1,))
        s = np.concatenate([sk, s], -1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sinks is not None:
        p = p[..., 1:]
    return p @ v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [1, 4, 17, 33])
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
@pytest.mark.parametrize("sinks", [False, True])
def test_attention_matches_mlx_and_numpy(rng, dtype, lq, mask, sinks):
    b, hq, hk, lk, d = 2, 9, 3, 37, 64
    q = rand(rng, (b, lq, hq, d), dtype).transpose(0, 2, 1, 3)
    big_k = rand(rng, (b, hk, 64, d), dtype)  # a cache's buffer: keys are a view of it
    k, v = big_k[:, :, :lk], rand(rng, (b, hk, lk, d), dtype)
    m = mask
    if mask == "bool":
        m = mx.array(rng.random((lq, lk)) > 0.3)
    elif mask == "additive":
        m = rand(rng, (1, hq, lq, lk), dtype)
    s = rand(rng, (hq,), dtype) if sinks else None
    scale = 1 / math.sqrt(d)
    ours = _core.scaled_dot_product_attention(q, k, v, scale=scale, mask=m, sinks=s)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=m, sinks=s)
    close(ours, ref, dtype)
    if dtype == mx.float32:
        np.testing.assert_allclose(
            np.array(ours), sdpa_numpy(q, k, v, scale, m, s), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("d", [64, 20, 128])
@pytest.mark.parametrize("lk", [1, 3, 4, 9, 517])
def test_attention_key_counts_and_head_dims(rng, d, lk):
    """Keys dotted four at a time and a vectorized exp: every tail (keys not a multiple of
    four, head dims not of eight), over a cache-like buffer, with sinks and a window."""
    b, hq, hk = 1, 4, 2
    q = rand(rng, (b, hq, 1, d)) * 3
    k = rand(rng, (b, hk, lk + 40, d))[:, :, :lk]
    v = rand(rng, (b, hk, lk, d))
    s = rand(rng, (hq,))
    m = mx.array(np.arange(lk)[None] >= lk - 5)  # a sliding window of 5
    scale = 1 / math.sqrt(d)
    for mask, sinks in [(None, None), ("causal", s), (m, s)]:
        ours = _core.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
        np.testing.assert_allclose(
            np.array(ours), sdpa_numpy(q, k, v, scale, mask, sinks), rtol=1e-5, atol=1e-5
        )


def test_attention_row_alone_equals_the_row_in_a_block_and_a_batch(rng):
    """A query row's result depends on its own keys only: alone (a decode step: its keys
    split over the threads in chunks), among a speculative step's verify rows and in a batch
    (the chunks taken in one task) it is the same bits, over several key chunks."""
    hq, hk, d, lk, lq = 9, 3, 64, 700, 5
    q, k, v = rand(rng, (3, hq, lq, d)), rand(rng, (3, hk, lk, d)), rand(rng, (3, hk, lk, d))
    for sinks in (None, rand(rng, (hq,))):
        block = np.array(
            _core.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal", sinks=sinks)
        )
        for b in range(3):
            for i in range(lq):
                n = lk - lq + i + 1
                alone = _core.scaled_dot_product_attention(
                    q[b : b + 1, :, i : i + 1],
                    k[b : b + 1, :, :n],
                    v[b : b + 1, :, :n],
                    scale=0.125,
                    sinks=sinks,
                )
                np.testing.assert_array_equal(np.array(alone)[0, :, 0], block[b, :, i])


def test_attention_nan_in_a_masked_chunk_still_propagates(rng):
    """A NaN score in a chunk of keys that is otherwise masked (its largest score the mask's)
    makes the row NaN, as one softmax over every key does."""
    q, k, v = rand(rng, (1, 1, 1, 8)), rand(rng, (1, 1, 600, 8)), rand(rng, (1, 1, 600, 8))
    keep = np.ones((1, 600), bool)
    keep[0, :256] = False
    kn = np.array(k)
    kn[0, 0, 7] = np.nan  # masked (-inf added), yet NaN + -inf stays NaN
    add = mx.array(np.where(keep, 0.0, -np.inf).astype(np.float32))
    ours = np.array(_core.scaled_dot_product_attention(q, mx.array(kn), v, scale=0.3, mask=add))
    ref = np.array(mx.fast.scaled_dot_product_attention(q, mx.array(kn), v, scale=0.3, mask=add))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    assert np.isnan(ours).all()


def test_attention_fully_masked_row_matches_mlx(rng):
    q, k, v = rand(rng, (1, 2, 1, 8)), rand(rng, (1, 2, 5, 8)), rand(rng, (1, 2, 5, 8))
    m = mx.zeros((1, 5), dtype=mx.bool_)
    close(
        _core.scaled_dot_product_attention(q, k, v, scale=0.3, mask=m),
        mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=m),
    )


@pytest.mark.parametrize("lq", [40, 300])
def test_attention_prompt_blocks_match_mlx_and_numpy(rng, lq):
    """A prompt's query rows (blocks of 16 over the threads): causal, a sliding window with
    sinks (gpt-oss), GQA, rows that see one key, keys and queries as views of wider buffers."""
    b, hq, hk, d = 1, 6, 2, 64
    q = rand(rng, (b, lq, hq, d)).transpose(0, 2, 1, 3)
    k = rand(rng, (b, hk, lq + 24, d))[:, :, :lq]
    v = rand(rng, (b, hk, lq, d))
    s = rand(rng, (hq,))
    i, j = np.arange(lq)[:, None], np.arange(lq)[None]
    window = mx.array((j <= i) & (j > i - 13))
    scale = 1 / math.sqrt(d)
    for mask, sinks in [("causal", None), ("causal", s), (window, s), (None, None)]:
        ours = _core.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
        close(ours, ref)
        np.testing.assert_allclose(
            np.array(ours), sdpa_numpy(q, k, v, scale, mask, sinks), rtol=1e-5, atol=1e-5
        )


def test_attention_prompt_with_fully_masked_rows_matches_mlx(rng):
    """Rows of a long block that see no key (a bool mask off throughout) weigh every key
    alike, as MLX's op does; their neighbours stay exact."""
    q, k, v = rand(rng, (1, 2, 40, 16)), rand(rng, (1, 2, 40, 16)), rand(rng, (1, 2, 40, 16))
    keep = np.tril(np.ones((40, 40), bool))
    keep[5] = keep[23] = False
    m = mx.array(keep)
    close(
        _core.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m),
        mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m),
    )


def test_attention_bad_input(rng):
    q, k = rand(rng, (1, 3, 1, 8)), rand(rng, (1, 2, 4, 8))
    with pytest.raises(ValueError):  # 3 query heads over 2 kv heads
        _core.scaled_dot_product_attention(q, k, k, scale=1.0)
    q = rand(rng, (1, 2, 1, 8))
    with pytest.raises(ValueError):
        _core.scaled_dot_product_attention(q, k, k, scale=1.0, mask="sliding")
    with pytest.raises(ValueError):  # a mask that does not broadcast
        _core.scaled_dot_product_attention(q, k, k, scale=1.0, mask=mx.ones((1, 3), mx.bool_))


def test_attention_grad_matches_mlx(rng):
    q, k, v = rand(rng, (1, 2, 1, 8)), rand(rng, (1, 1, 6, 8)), rand(rng, (1, 1, 6, 8))

    def g(op):
        return mx.grad(lambda q, k, v: op(q, k, v, scale=0.5).sum(), argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(
        g(_core.scaled_dot_product_attention),
        g(mx.fast.scaled_dot_product_attention),
        strict=True,
    ):
        close(a, b)


def test_compile_and_gpu_fallback(rng):
    x, w = rand(rng, (2, 16)), rand(rng, (16,))
    f = mx.compile(lambda x: _core.rms_norm(x, w, 1e-5) * 2)
    close(f(x), mx.fast.rms_norm(x, w, 1e-5) * 2)
    if mx.metal.is_available():  # pragma: no cover - no GPU on CI
        with mx.stream(mx.gpu):
            close(_core.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))


def test_attention_propagates_nan_and_inf_like_mlx(rng):
    """A NaN in a key or an infinite score gives what MLX's attention gives (NaN), not a
    finite number: the vectorized exp passes NaN through and overflows to inf."""
    q = rng.standard_normal((1, 2, 1, 64)).astype(np.float32)
    k = rng.standard_normal((1, 2, 9, 64)).astype(np.float32)
    v = rng.standard_normal((1, 2, 9, 64)).astype(np.float32)
    k[0, 0, 3, 5] = np.nan
    k[0, 1, 2, 7] = np.inf
    args = (mx.array(q), mx.array(k), mx.array(v))
    ours = np.array(_core.scaled_dot_product_attention(*args, scale=0.125))
    ref = np.array(mx.fast.scaled_dot_product_attention(*args, scale=0.125))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    assert np.isnan(ours[0, 0]).all()


# ---- SwiGLU -----------------------------------------------------------------


def swiglu_numpy(g, x):
    g, x = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (g, x))
    return g / (1 + np.exp(-g)) * x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1536), (1, 480, 96), (3, 7), (5,), (2, 3, 4, 9)])
def test_swiglu_matches_mlx_lm_and_numpy(rng, dtype, shape):
    from mlx_lm.models.activations import swiglu

    g, x = rand(rng, shape, dtype) * 4, rand(rng, shape, dtype)
    ours = _core.swiglu(g, x)
    close(ours, swiglu(g, x), dtype)
    if dtype == mx.float32:
        np.testing.assert_allclose(np.array(ours), swiglu_numpy(g, x), rtol=1e-5, atol=1e-6)


def test_swiglu_strided_mixed_dtypes_extremes_and_fallbacks(rng):
    from mlx_lm.models.activations import swiglu

    g = rand(rng, (6, 40)).T * 30  # strided rows; exp over- and underflows
    x = rand(rng, (40, 6), mx.bfloat16)
    close(_core.swiglu(g, x), swiglu(g, x))
    special = mx.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 100.0, -100.0, 89.0])
    ones = mx.ones((8,))
    np.testing.assert_array_equal(
        np.isnan(np.array(_core.swiglu(special, ones))), np.isnan(np.array(swiglu(special, ones)))
    )
    fin = np.isfinite(np.array(swiglu(special, ones)))
    np.testing.assert_allclose(
        np.array(_core.swiglu(special, ones))[fin], np.array(swiglu(special, ones))[fin], rtol=1e-6
    )
    # broadcasting, empty and integer inputs take MLX's ops
    a, b = rand(rng, (3, 4)), rand(rng, (4,))
    close(_core.swiglu(a, b), swiglu(a, b))
    assert _core.swiglu(mx.zeros((0, 4)), mx.zeros((0, 4))).shape == (0, 4)
    ints = mx.arange(6).reshape(2, 3)
    close(_core.swiglu(ints, ints), swiglu(ints, ints))
    f = mx.compile(lambda a, b: _core.swiglu(a, b) * 2)
    close(f(g, x), swiglu(g, x) * 2)
    grad = mx.grad(lambda a: _core.swiglu(a, x).sum())(g)
    close(grad, mx.grad(lambda a: swiglu(a, x).sum())(g))


def test_swiglu_switch_leaves_mlx_lm_activations_alone(rng):
    """GPT-OSS's SwigluOAI lives in mlx-lm's activations module beside ``swiglu``: switching a
    model that holds one must not replace ``activations.swiglu`` with ours, whose fallback
    (switched off) calls it (that recursed without end)."""
    import mlx.nn as nn
    from mlx_lm.models import activations

    from mlx_harmony_core.cpu import fused

    original = activations.swiglu

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = activations.SwigluOAI()

    fused.use_fused_layers(Holder())
    assert activations.swiglu is original
    g, x = rand(rng, (2, 16)), rand(rng, (2, 16))
    with fused.fused(False):
        close(fused.swiglu(g, x), original(g, x))
    close(fused.swiglu(g, x), original(g, x))
