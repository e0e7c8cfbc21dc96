"""The fused decoder-block primitives (``block_attn_in``, ``block_attn_out_mlp``) against
MLX's own ops, and a llama model switched to :class:`FusedLlamaBlock` against the op-by-op
path: values within float32 rounding, odd shapes, biases, per-row offsets, sliding windows,
batched caches, long blocks, bad input, transforms."""

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_harmony_core import _core
from mlx_harmony_core.cpu import fused
from mlx_harmony_core.cpu.layers import use_cpu_layers
from mlx_harmony_core.kv_cache import RotatingKVCache, make_cache

TOL = {mx.float32: 3e-5, mx.bfloat16: 6e-2, mx.float16: 1e-2}


def rand(rng, shape, dtype=mx.float32, scale=1.0):
    return mx.array(scale * rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def close(a, b, dtype=mx.float32) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    a32, b32 = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    scale = max(1.0, float(np.abs(b32).max()))
    np.testing.assert_allclose(a32, b32, rtol=0, atol=TOL[dtype] * scale)


def linear(rng, rows, cols, dtype, group=32, bits=4, mode="affine", bias=False):
    w = rand(rng, (rows, cols), scale=0.1)
    if mode == "mxfp4":
        wq, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        biases = None
    else:
        wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        scales, biases = scales.astype(dtype), biases.astype(dtype)
    b = rand(rng, (rows,), dtype, 0.1) if bias else None
    return (wq, scales, biases, b, group, bits, mode)


def ref_linear(x, lin):
    wq, scales, biases, b, group, bits, mode = lin
    y = mx.quantized_matmul(
        x, wq, scales, biases, transpose=True, group_size=group, bits=bits, mode=mode
    )
    return y + b if b is not None else y


def ref_attn_in(x, w, eps, q, k, v, heads, kv_heads, rope, offset):
    dims, trad, base, scale, freqs = rope
    B, L, _ = x.shape
    xn = mx.fast.rms_norm(x, w, eps)

    def split(y, n):
        return y.reshape(B, L, n, -1).transpose(0, 2, 1, 3)

    qs, ks = split(ref_linear(xn, q), heads), split(ref_linear(xn, k), kv_heads)
    vs = split(ref_linear(xn, v), kv_heads)
    off = offset if isinstance(offset, mx.array) else mx.array(offset)
    qs = mx.fast.rope(qs, dims, traditional=trad, base=base, scale=scale, offset=off, freqs=freqs)
    ks = mx.fast.rope(ks, dims, traditional=trad, base=base, scale=scale, offset=off, freqs=freqs)
    return qs, ks, vs


def ref_out_mlp(attn, x, o, w, eps, gate, up, down):
    B, L, _ = x.shape
    h = x + ref_linear(attn.transpose(0, 2, 1, 3).reshape(B, L, -1), o)
    n = mx.fast.rms_norm(h, w, eps)
    g, u = ref_linear(n, gate), ref_linear(n, up)
    return h + ref_linear(g * mx.sigmoid(g) * u, down)


def attn_in_case(rng, dtype, B, L, D, heads, kv_heads, hd, rope, offset, **lin):
    x = rand(rng, (B, L, D), dtype)
    w = rand(rng, (D,), dtype)
    q = linear(rng, heads * hd, D, dtype, **lin)
    k = linear(rng, kv_heads * hd, D, dtype, **lin)
    v = linear(rng, kv_heads * hd, D, dtype, **lin)
    dims, trad, base, scale, freqs = rope
    ours = _core.block_attn_in(
        x, w, 1e-5, q, k, v,
        n_heads=heads, n_kv_heads=kv_heads, rope_dims=dims, rope_traditional=trad,
        rope_base=base, rope_scale=scale, rope_freqs=freqs, offset=offset,
    )  # fmt: skip
    ref = ref_attn_in(x, w, 1e-5, q, k, v, heads, kv_heads, rope, offset)
    return ours, ref


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize(
    "lin",
    [
        {},
        {"group": 64, "bits": 8, "bias": True},
        {"group": 32, "bits": 4, "mode": "mxfp4"},
        {"group": 128, "bits": 4},
    ],
)
@pytest.mark.parametrize("L", [1, 3, 16])
def test_attn_in_matches_mlx(rng, dtype, lin, L):
    ours, ref = attn_in_case(
        rng, dtype, 2, L, 128, 6, 2, 32, (32, False, 10000.0, 1.0, None), 7, **lin
    )
    assert len(ours) == 3
    for a, b in zip(ours, ref, strict=True):
        close(a, b, dtype)


def test_attn_in_partial_traditional_freqs_and_row_offsets(rng):
    freqs = mx.array((1.5 ** np.arange(8)).astype(np.float32))
    offsets = mx.array([3, 40, 0], dtype=mx.int32)
    for rope in [(16, True, None, 1.0, freqs), (12, False, 500.0, 0.5, None)]:
        ours, ref = attn_in_case(rng, mx.float32, 3, 2, 96, 3, 1, 32, rope, offsets)
        for a, b in zip(ours, ref, strict=True):
            close(a, b)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("L", [1, 5])
def test_attn_out_mlp_matches_mlx(rng, dtype, L):
    B, D, H, hd, F = 2, 128, 3, 32, 192
    attn = rand(rng, (B, H, L, hd), dtype)
    x = rand(rng, (B, L, D), dtype)
    w = rand(rng, (D,), dtype)
    o = linear(rng, D, H * hd, dtype, bias=True)
    gate, up = linear(rng, F, D, dtype), linear(rng, F, D, dtype, group=64, bits=8)
    down = linear(rng, D, F, dtype)
    ours = _core.block_attn_out_mlp(attn, x, o, w, 1e-5, gate, up, down)
    close(ours, ref_out_mlp(attn, x, o, w, 1e-5, gate, up, down), dtype)
    # A strided attention output (the transposed view attention functions can return).
    at = rand(rng, (B, L, H, hd), dtype).transpose(0, 2, 1, 3)
    ours = _core.block_attn_out_mlp(at, x, o, w, 1e-5, gate, up, down)
    close(ours, ref_out_mlp(at, x, o, w, 1e-5, gate, up, down), dtype)


def test_long_blocks_and_float_weights_take_mlx_ops(rng):
    # 17 rows: MLX-level ops (the same values); float "scales" that our kernels do not
    # take (a float16 x with float32 norm weight promotes): the reference path too.
    ours, ref = attn_in_case(rng, mx.float32, 1, 17, 64, 2, 2, 32, (32, False, 1e4, 1.0, None), 0)
    for a, b in zip(ours, ref, strict=True):
        close(a, b)
    x = rand(rng, (1, 1, 64), mx.float16)
    q = linear(rng, 64, 64, mx.float16)
    out = _core.block_attn_in(
        x, rand(rng, (64,)), 1e-5, q, q, q, n_heads=2, n_kv_heads=2, rope_dims=32,
        rope_traditional=False, rope_base=1e4, rope_scale=1.0, offset=0,
    )  # fmt: skip
    assert out[0].dtype == mx.float32  # MLX's promotion, as the op-by-op graph does


def test_bad_input(rng):
    q = linear(rng, 64, 64, mx.float32)
    args = dict(n_heads=2, n_kv_heads=2, rope_dims=32, rope_traditional=False,
                rope_base=1e4, rope_scale=1.0, offset=0)  # fmt: skip
    with pytest.raises(ValueError):  # x's width is not the weights'
        mx.eval(_core.block_attn_in(rand(rng, (1, 1, 96)), rand(rng, (96,)), 1e-5, q, q, q, **args))
    with pytest.raises(ValueError):  # heads that do not divide the rows
        bad = dict(args, n_heads=3, n_kv_heads=3)
        mx.eval(_core.block_attn_in(rand(rng, (1, 1, 64)), rand(rng, (64,)), 1e-5, q, q, q, **bad))
    with pytest.raises(ValueError):
        _core.block_attn_in(
            rand(rng, (1, 1, 64)), rand(rng, (64,)), 1e-5, q, q, q, **dict(args, n_heads=0)
        )
    with pytest.raises(TypeError):
        _core.block_attn_in(rand(rng, (1, 1, 64)), rand(rng, (64,)), 1e-5, q[:3], q, q, **args)


def test_grad_matches_mlx(rng):
    B, L, D, H, hd, F = 1, 2, 64, 2, 32, 128
    attn, x, w = rand(rng, (B, H, L, hd)), rand(rng, (B, L, D)), rand(rng, (D,))
    o, gate, up = (
        linear(rng, D, H * hd, mx.float32),
        linear(rng, F, D, mx.float32),
        linear(rng, F, D, mx.float32),
    )
    down = linear(rng, D, F, mx.float32)

    def g(fn):
        return mx.grad(lambda a, x: fn(a, x, o, w, 1e-5, gate, up, down).sum(), argnums=(0, 1))(
            attn, x
        )

    for a, b in zip(g(_core.block_attn_out_mlp), g(ref_out_mlp), strict=True):
        close(a, b)


# ---- a llama model on the fused block -----------------------------------------------


def tiny_llama(rng, *, bits=4, group=32):
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=192, num_hidden_layers=3, intermediate_size=320,
        num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300,
        rope_theta=10000.0, tie_word_embeddings=True,
    )  # fmt: skip
    model = llama.Model(args)
    model.update(nn.utils.tree_map(lambda p: rand(rng, p.shape, scale=0.3), model.parameters()))
    nn.quantize(model, group_size=group, bits=bits)
    use_cpu_layers(model)
    mx.eval(model.parameters())
    return model


def _steps(model, prompt, steps, new_cache):
    cache = new_cache(model)
    out = [model(mx.array(prompt)[None], cache=cache)[:, -1]]
    tok = prompt[-1]
    for k in range(steps):
        inputs = (
            mx.array([[tok, (tok + 7) % 300]]) if k == 1 else mx.array([[tok]])
        )  # a 2-row verify
        logits = model(inputs, cache=cache)[:, -1]
        out.append(logits)
        tok = int(mx.argmax(logits).item())
    mx.eval(out)
    return [np.array(o) for o in out]


CACHES = {
    "full": make_cache,
    "quantized": lambda m: make_cache(m, kv_bits=8),
    "window": lambda m: [RotatingKVCache(24, 0, 0) for _ in m.layers],
}


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_llama_model_matches_op_by_op(rng, monkeypatch, kind):
    model = tiny_llama(rng)
    assert type(model.model.layers[0]).__name__ == "FusedLlamaBlock"
    calls = {"n": 0}
    from mlx_harmony_core.cpu import block

    fused_block = _core.FusedBlock

    class Counted:  # a FusedBlock whose steps are counted
        def __init__(self, *a):
            self.inner = fused_block(*a)

        def step(self, *a):
            calls["n"] += 1
            return self.inner.step(*a)

    orig = block._core.block_attn_in

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(block._core, "block_attn_in", counted, raising=False)
    monkeypatch.setattr(block._core, "FusedBlock", Counted, raising=False)
    prompt = [int(t) for t in rng.integers(0, 300, 30)]  # past the 24-token window
    ours = _steps(model, prompt, 5, CACHES[kind])
    assert calls["n"] >= 3 * 5
    with fused.fused(False):
        ref = _steps(model, prompt, 5, CACHES[kind])
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def test_random_biases_are_read(rng):
    layer = tiny_llama(rng).model.layers[0]
    assert layer._fused_args()[0].implicit_zeros == [0] * 7


def test_kept_arguments_follow_weight_and_module_swaps(rng):
    """The block keeps its argument tuple between calls; model.update, a swapped submodule
    (as LoRA does) and a switched-off block still give the op-by-op logits."""
    model = tiny_llama(rng)
    layer = model.model.layers[0]
    prompt = [int(t) for t in rng.integers(0, 300, 12)]

    def both():
        ours = _steps(model, prompt, 3, make_cache)
        with fused.fused(False):
            ref = _steps(model, prompt, 3, make_cache)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
        return ours

    before = both()
    first = layer._fused_args()
    assert first is not None and layer._fused_args() is first  # kept between calls
    # New weights through model.update: the kept tuple is rebuilt from the live arrays.
    qp = layer.self_attn.q_proj
    model.update({"model": {"layers": [{"self_attn": {"q_proj": {"scales": qp.scales * 1.5}}}]}})
    assert layer._fused_args() is not first
    after = both()
    assert not np.allclose(before[-1], after[-1])
    # A new norm weight and a swapped-in module (not on our kernels: the op-by-op path).
    layer.post_attention_layernorm.weight = layer.post_attention_layernorm.weight * 0.5
    both()
    layer.mlp.up_proj = nn.Linear(192, 320, bias=False)
    assert layer._fused_args() is None
    both()


# ---- the whole model's step as one primitive ----------------------------------------


def _stack_calls(monkeypatch):
    from mlx_harmony_core.cpu import block

    calls = {"n": 0, "taken": 0}
    orig = block._core.fused_stack_step

    def counted(*a, **k):
        calls["n"] += 1
        out = orig(*a, **k)
        calls["taken"] += out is not None
        return out

    monkeypatch.setattr(block._core, "fused_stack_step", counted, raising=False)
    return calls


def _decode(model, prompt, steps, cache):
    """As a decode loop runs: each step evaluated before the next (a 2-row verify too)."""
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    mx.eval(logits)
    out, tok = [logits], prompt[-1]
    for k in range(steps):
        inputs = mx.array([[tok, (tok + 7) % 300]]) if k == 1 else mx.array([[tok]])
        logits = model(inputs, cache=cache)[:, -1]
        mx.eval(logits)
        out.append(logits)
        tok = int(mx.argmax(logits).item())
    return [np.array(o) for o in out]


@pytest.mark.parametrize("prompt_len", [5, 30])
def test_stack_step_matches_op_by_op(rng, monkeypatch, prompt_len):
    """Every layer in one primitive (prompts within 16 rows too, decode, a 2-row verify):
    the op-by-op logits, the caches hold the same keys and values after, and a decode
    loop's buffers are updated in place (MLX donates them)."""
    model = tiny_llama(rng)
    assert type(model.model).__name__ == "FusedLlamaModel"
    calls = _stack_calls(monkeypatch)
    prompt = [int(t) for t in rng.integers(0, 300, prompt_len)]
    caches = [make_cache(model), make_cache(model)]

    copies = _core.fused_stack_copies()
    ours = _decode(model, prompt, 6, caches[0])
    assert calls["taken"] >= 6 + (prompt_len <= 16)
    assert _core.fused_stack_copies() == copies  # every buffer updated in place
    with fused.fused(False):
        ref = _decode(model, prompt, 6, caches[1])
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    for c_ours, c_ref in zip(*caches, strict=True):
        assert c_ours.offset == c_ref.offset == prompt_len + 7
        for a, b in zip(c_ours.state, c_ref.state, strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-4)


def test_stack_step_grows_cache_and_keeps_held_rows(rng, monkeypatch):
    """Decoding across the caches' capacity (256 rows) grows their buffers; views of the
    caches' rows held elsewhere keep their values: appends above them update in place, a
    step after a trim (it would write rows a view sees) copies the buffers."""
    model = tiny_llama(rng)
    calls = _stack_calls(monkeypatch)
    prompt = [int(t) for t in rng.integers(0, 300, 250)]
    cache, ref_cache = make_cache(model), make_cache(model)
    mx.eval(model(mx.array(prompt)[None], cache=cache))
    with fused.fused(False):
        mx.eval(model(mx.array(prompt)[None], cache=ref_cache))

    def held_views():
        views = [c.state for c in cache]
        mx.eval(views)
        return views, [[np.array(a) for a in v] for v in views]

    def step(tok):
        ours = model(mx.array([[tok]]), cache=cache)[:, -1]
        with fused.fused(False):
            ref = model(mx.array([[tok]]), cache=ref_cache)[:, -1]
        mx.eval(ours, ref)
        np.testing.assert_allclose(
            np.array(ours), np.array(ref), rtol=0, atol=1e-4 * np.abs(np.array(ref)).max()
        )
        return int(mx.argmax(ref).item())

    held = [held_views()]
    tok = prompt[-1]
    for _ in range(10):
        tok = step(tok)
    held.append(held_views())
    for c in (*cache, *ref_cache):
        c.trim(4)
    copies = _core.fused_stack_copies()
    for _ in range(3):
        tok = step(tok)
    assert _core.fused_stack_copies() > copies  # the first step after the trim copied
    assert calls["taken"] == 13
    for views, snapshot in held:
        for view, snap in zip(views, snapshot, strict=True):
            for a, b in zip(view, snap, strict=True):
                np.testing.assert_array_equal(np.array(a), b)


def test_stack_step_declines_what_it_does_not_take(rng, monkeypatch):
    """Long blocks, other caches, no cache and a switched-off block run layer by layer."""
    model = tiny_llama(rng)
    calls = _stack_calls(monkeypatch)
    x = mx.array([[1, 2, 3]])
    mx.eval(model(x))  # no cache
    mx.eval(model(mx.array([list(range(20))]), cache=make_cache(model)))  # 20 rows
    mx.eval(model(x, cache=make_cache(model, kv_bits=8)))  # quantized cache
    assert calls["taken"] == 0
    model.model.layers[1].mlp.up_proj = nn.Linear(192, 320, bias=False)  # not fusable
    mx.eval(model(x, cache=make_cache(model)))
    assert calls["taken"] == 0
    with pytest.raises(ValueError, match="one cache per block"):
        _core.fused_stack_step([], mx.zeros((1, 1, 192)), [_core.KVCache()])


def test_stack_step_copy_on_two_streams(rng):
    """A cache and its copy() share buffers: stepping the original on one stream (queued
    behind other work) and the trimmed copy on another must not let the copy write the
    shared rows in place before the original's step read them."""
    model = tiny_llama(rng)
    prompt = [int(t) for t in rng.integers(0, 300, 20)]

    def prepared():
        c = make_cache(model)
        mx.eval(model(mx.array([prompt]), cache=c))
        for t in range(30):
            mx.eval(model(mx.array([[t]]), cache=c))
        return c

    def run(on):
        c = prepared()
        c1 = [x.copy() for x in c]
        for x in c1:
            x.trim(5)
        s1, s2 = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
        big = mx.random.normal((1000, 1000), stream=s1)
        mx.eval(big)
        with fused.fused(on):
            with mx.stream(s1):
                slow = big
                for _ in range(4):
                    slow = slow @ big
                mx.async_eval(slow)  # s1 is busy: the original's step waits behind it
                a = model(mx.array([[7]]), cache=c)[:, -1]
                mx.async_eval(a)
            with mx.stream(s2):
                b = model(mx.array([[9]]), cache=c1)[:, -1]
                mx.async_eval(b)
            mx.eval(a, b, slow)
        return np.array(a), np.array(b)

    ref = run(False)
    for ours, want in zip(run(True), ref, strict=True):
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_stack_step_leaves_transforms_to_the_layers(rng, monkeypatch):
    """mx.grad through the model with a KVCache: the one-primitive step (no transforms)
    declines traced inputs, so gradients come from the layer-by-layer path."""
    model = tiny_llama(rng)
    calls = _stack_calls(monkeypatch)
    e = model.model.embed_tokens(mx.array([[3, 4, 5]]))

    def f(e):
        return model.model(None, cache=make_cache(model), input_embeddings=e).sum()

    g = mx.grad(f)(e)
    with fused.fused(False):
        want = mx.grad(f)(e)
    mx.eval(g, want)
    assert calls["taken"] == 0
    np.testing.assert_allclose(
        np.array(g), np.array(want), rtol=0, atol=1e-4 * np.abs(np.array(want)).max()
    )


def test_stack_step_batch_cache_matches_op_by_op(rng, monkeypatch):
    """The scheduler's BatchKVCache through the one-primitive step, against MLX's ops:
    pipelined decode (step n+1 built before step n is read), extract with its views held
    while the batch decodes on, per-row rewinds leaving holes, a 3-token verify, filter and
    insert, growth past the buffers' capacity."""
    from mlx_harmony_core.kv_cache import make_batch_cache

    model = tiny_llama(rng)
    calls = _stack_calls(monkeypatch)
    prompts = [[int(x) for x in rng.integers(0, 300, n)] for n in (7, 20, 12)]
    toks = [int(x) for x in rng.integers(0, 300, 400)]

    def run(on):
        log, held = [], []
        with fused.fused(on):
            singles = []
            for p in prompts:
                c = make_cache(model)
                mx.eval(model(mx.array(p)[None], cache=c))
                singles.append(c)
            batch = make_batch_cache(singles[0])
            for c in singles[:2]:
                for layer, s in zip(batch, c, strict=True):
                    layer.insert(s)
            rows, pending = 2, None

            def read():
                nonlocal pending
                log.append(np.array(pending))
                pending = None

            for step in range(280):
                inputs = mx.array([[toks[(step + i) % 400]] for i in range(rows)])
                out = model(inputs, cache=batch)[:, -1]
                mx.async_eval(out)
                if pending is not None:
                    read()
                pending = out
                if step in (5, 40):  # extract a row; hold its evaluated views
                    ext = [layer.extract(step // 40) for layer in batch]
                    views = [c.state for c in ext]
                    mx.eval(views)
                    held.append((views, [[np.array(a) for a in v] for v in views]))
                if step == 8:  # per-row rewinds (holes), a 3-token verify, rewind again
                    read()
                    for layer in batch:
                        layer.rewind([2, 0])
                    inputs = mx.array(
                        [[toks[(step + 1 + j + i) % 400] for j in range(3)] for i in range(rows)]
                    )
                    log.append(np.array(model(inputs, cache=batch)))
                    for layer in batch:
                        layer.rewind([1, 2])
                if step == 12:  # a row leaves while a step is queued
                    read()
                    for layer in batch:
                        layer.filter([0])
                    rows = 1
                if step == 15:  # a row joins
                    read()
                    for layer, s in zip(batch, singles[2], strict=True):
                        layer.insert(s)
                    rows = 2
            read()
        for views, snapshot in held:  # views handed out never change
            for view, snap in zip(views, snapshot, strict=True):
                for a, b in zip(view, snap, strict=True):
                    np.testing.assert_array_equal(np.array(a), b)
        return log

    ours = run(True)
    assert calls["taken"] >= 270
    ref = run(False)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_same_objects_checks_identity():
    """``_core.same_objects``: a dict key's value, an object's type, a list item, each by
    identity; an absent key reads as None; anything but a tuple of triples is a TypeError."""
    a, b = mx.zeros((2,)), mx.zeros((2,))
    d, items = {"w": a}, [a, b]
    assert _core.same_objects(())
    assert _core.same_objects(((d, "w", a), (d, None, dict), (items, 1, b), (d, "x", None)))
    assert not _core.same_objects(((d, "w", b),))
    assert not _core.same_objects(((d, None, list),))
    assert not _core.same_objects(((items, 0, b),))
    assert not _core.same_objects(((items, 2, a),))  # past the end
    assert not _core.same_objects(((items, "w", a),))  # a str key of a list
    with pytest.raises(TypeError):
        _core.same_objects([(d, "w", a)])
    with pytest.raises(TypeError):
        _core.same_objects(((d, "w"),))


def test_stack_step_follows_layer_swaps(rng, monkeypatch):
    """The model keeps its layers' FusedBlock list between steps (one check a token) and
    rebuilds it from the live arrays after model.update; a layer replaced in the list or a
    submodule off our kernels runs the layers one by one: the op-by-op logits throughout."""
    model = tiny_llama(rng)
    calls = _stack_calls(monkeypatch)
    prompt = [int(t) for t in rng.integers(0, 300, 8)]

    def both():
        ours = _decode(model, prompt, 3, make_cache(model))
        with fused.fused(False):
            ref = _decode(model, prompt, 3, make_cache(model))
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
        return ours

    before = both()
    memo = model.model._stack_memo
    assert memo[1] is not None and len(memo[1]) == 3
    taken = calls["taken"]
    assert taken >= 4
    both()
    assert model.model._stack_memo is memo  # kept between steps
    layer = model.model.layers[2]
    up = layer.mlp.up_proj
    model.update({"model": {"layers": [{}, {}, {"mlp": {"up_proj": {"scales": up.scales * 2}}}]}})
    after = both()
    assert model.model._stack_memo is not memo and calls["taken"] > taken + 4
    assert not np.allclose(before[-1], after[-1])
    # A plain block (the same weights) swapped into the list: the layers run one by one.
    from mlx_lm.models import llama

    plain = copy.copy(layer)
    plain.__class__ = llama.TransformerBlock
    model.model.layers[2] = plain
    taken = calls["taken"]
    both()
    assert calls["taken"] == taken
    model.model.layers[2] = layer
    layer.mlp.up_proj = nn.Linear(192, 320, bias=False)
    both()
    assert calls["taken"] == taken


def test_stack_step_follows_layers_appended_and_reclassed(rng, monkeypatch):
    """A layer appended to the list in place, or a plain layer turned into ours in place:
    the next step re-reads the layers (one FusedBlock per cache; the one call again)."""
    from mlx_lm.models import llama

    model = tiny_llama(rng)
    calls = _stack_calls(monkeypatch)
    prompt = [int(t) for t in rng.integers(0, 300, 8)]
    _decode(model, prompt, 2, make_cache(model))
    model.model.layers.append(model.model.layers[-1])  # shared weights: a 4th block
    ours = _decode(model, prompt, 2, make_cache(model))
    assert len(model.model._stack_memo[1]) == 4
    with fused.fused(False):
        ref = _decode(model, prompt, 2, make_cache(model))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    layer = model.model.layers[1]
    ours_class = layer.__class__
    layer.__class__ = llama.TransformerBlock
    _decode(model, prompt, 2, make_cache(model))
    assert model.model._stack_memo[1] is None
    taken = calls["taken"]
    layer.__class__ = ours_class
    _decode(model, prompt, 2, make_cache(model))
    assert model.model._stack_memo[1] is not None and calls["taken"] > taken


@pytest.mark.parametrize(
    ("bits", "group", "zero"), [(4, 32, 8), (8, 32, 128), (5, 32, 16), (6, 32, 32), (3, 32, 4)]
)
def test_stack_step_with_implicit_biases(rng, monkeypatch, bits, group, zero):
    """GGUF's Q4_0/Q8_0/Q5_0/Q6_K load with biases exactly -zero * scales: the kept layers
    find that once and the kernels derive the biases instead of reading them. The logits
    are the op-by-op ones."""
    model = tiny_llama(rng, bits=bits, group=group)
    for _, m in model.named_modules():
        if "biases" in m and "scales" in m:
            m["biases"] = (m["scales"] * -zero).astype(m["scales"].dtype)
    mx.eval(model.parameters())
    layer = model.model.layers[0]
    assert layer._fused_args()[0].implicit_zeros == [zero] * 7
    calls = _stack_calls(monkeypatch)
    prompt = [int(t) for t in rng.integers(0, 300, 9)]
    ours = _decode(model, prompt, 4, make_cache(model))
    assert calls["taken"] >= 4
    with fused.fused(False):
        ref = _decode(model, prompt, 4, make_cache(model))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
