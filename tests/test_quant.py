"""Quantized matmul kernels (affine 4/8-bit, MXFP4) against a float64 reference and MLX."""

from __future__ import annotations

import subprocess
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import _core, quant

FORMATS = [
    ("affine", 4, 32),
    ("affine", 4, 64),
    ("affine", 4, 128),
    ("affine", 8, 32),
    ("affine", 8, 64),
    ("affine", 8, 128),
    ("mxfp4", 4, 32),
]
ISAS = _core.quant_isas()
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True)
def _restore_isa():
    isa, threads, rows = _core.quant_isa(), _core.quant_threads(), _core.quant_gemm_rows()
    yield
    _core.set_quant_isa(isa)
    _core.set_quant_threads(threads)
    _core.set_quant_gemm_rows(rows)


def test_isas_ranked_fastest_first():
    """The kernels start on the first ISA of the ranking (AVX2 ahead of AVX-512 on Zen 4),
    every ISA is listed once with the portable code last, and an unknown name is refused."""
    code = "from mlx_harmony_core import _core; print(_core.quant_isa())"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert fresh.stdout.strip() == ISAS[0], fresh.stderr
    assert len(set(ISAS)) == len(ISAS) and ISAS[-1] == "generic"
    with pytest.raises(ValueError, match="quant_isas"):
        _core.set_quant_isa("avx1024")


def quantized(shape, mode, bits, gs, seed, dtype=mx.float32):
    key = mx.random.key(seed)
    w = mx.random.normal(shape, key=key).astype(dtype)
    q = mx.quantize(w, group_size=gs, bits=bits, mode=mode)
    return q[0], q[1], (q[2] if len(q) > 2 else None)


def dequantized(w, scales, biases, mode, bits, gs):
    """The weights as float64: what the kernels must multiply by."""
    d = mx.dequantize(w, scales, biases, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
    return np.array(d).astype(np.float64)


def check_close(out, x64, w64, transpose, scale=1.0):
    """Within float32 rounding of the float64 product: a few ulps of sqrt(K) * sum |x w|."""
    ref = x64 @ (w64.T if transpose else w64)
    mag = np.abs(x64) @ np.abs(w64.T if transpose else w64)
    k = x64.shape[-1]
    bound = 8 * np.sqrt(k) * EPS32 * mag * scale + 1e-30
    err = np.abs(np.array(out.astype(mx.float32)).astype(np.float64) - ref)
    assert (err <= bound).all(), (
        f"max err {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode,bits,gs", FORMATS)
@pytest.mark.parametrize("transpose", [True, False])
def test_quantized_matmul_matches_reference(isa, mode, bits, gs, transpose):
    _core.set_quant_isa(isa)
    seed = hash((isa, mode, bits, gs, transpose)) % 1000
    k, n = 3 * gs, 77 if transpose else 2 * gs  # odd output rows where the layout allows
    w, s, b = quantized((n, k) if transpose else (k, n), mode, bits, gs, seed)
    w64 = dequantized(w, s, b, mode, bits, gs)
    for rows in (1, 2, 3, 4, 5, 8, 15, 16, 17, 33, 600):
        x = mx.random.normal((rows, k), key=mx.random.key(seed + rows))
        out = _core.quantized_matmul(x, w, s, b, transpose, gs, bits, mode)
        mine = mx.quantized_matmul(
            x, w, s, b, transpose=transpose, group_size=gs, bits=bits, mode=mode
        )
        assert out.shape == mine.shape and out.dtype == mine.dtype
        check_close(out, np.array(x).astype(np.float64), w64, transpose)
        np.testing.assert_allclose(np.array(out), np.array(mine), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mode,bits,gs", FORMATS)
def test_batch_dims_and_vector_x(mode, bits, gs):
    k = 2 * gs
    w, s, b = quantized((40, k), mode, bits, gs, 7)
    w64 = dequantized(w, s, b, mode, bits, gs)
    for shape in [(k,), (3, k), (2, 3, k), (2, 1, 5, k)]:
        x = mx.random.normal(shape, key=mx.random.key(len(shape)))
        out = _core.quantized_matmul(x, w, s, b, True, gs, bits, mode)
        mine = mx.quantized_matmul(x, w, s, b, group_size=gs, bits=bits, mode=mode)
        assert out.shape == mine.shape
        check_close(out.reshape(-1, 40), np.array(x).reshape(-1, k).astype(np.float64), w64, True)


def test_strided_inputs():
    w, s, b = quantized((64, 128), "affine", 4, 32, 3)
    x = mx.random.normal((128, 6)).T  # a transposed view: not row contiguous
    out = _core.quantized_matmul(x, w, s, b, group_size=32)
    ref = mx.quantized_matmul(x, w, s, b, group_size=32)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
    xs = mx.random.normal((12, 128))[::2]  # strided rows
    out = _core.quantized_matmul(xs, w, s, b, group_size=32)
    ref = mx.quantized_matmul(xs, w, s, b, group_size=32)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision(dtype):
    """Half-precision inputs compute in float32 and round once at the end."""
    w, s, b = quantized((96, 256), "affine", 4, 64, 5, dtype=dtype)
    assert s.dtype == dtype
    x = mx.random.normal((3, 256)).astype(dtype)
    out = _core.quantized_matmul(x, w, s, b, group_size=64)
    assert out.dtype == dtype
    x64 = np.array(x.astype(mx.float32)).astype(np.float64)
    w64 = np.array(
        mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64)
    ).astype(np.float64)
    ref = x64 @ w64.T
    err = np.abs(np.array(out.astype(mx.float32)) - ref)
    ulp = 2.0 ** -(10 if dtype == mx.float16 else 7)
    assert (err <= np.abs(ref) * ulp + 1e-2).all()
    # float32 activations with float16 scales (GGUF models): float32 out, float32 accuracy
    x32 = mx.random.normal((2, 256))
    out = _core.quantized_matmul(x32, w, s, b, group_size=64)
    assert out.dtype == mx.float32
    check_close(out, np.array(x32).astype(np.float64), w64, True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode,bits,gs", [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32)])
def test_gather_qmm_matches_reference(isa, mode, bits, gs):
    _core.set_quant_isa(isa)
    experts, n, k = 8, 48, 2 * gs
    w, s, b = quantized((experts, n, k), mode, bits, gs, 11)
    w64 = np.stack(
        [
            dequantized(w[e], s[e], None if b is None else b[e], mode, bits, gs)
            for e in range(experts)
        ]
    )
    rng = np.random.default_rng(0)
    for tokens in (1, 3, 40):
        # decode / prefill as SwitchGLU calls it: x (T, 1, 1, K), rhs (T, top_k), unsorted
        x = mx.random.normal((tokens, 1, 1, k), key=mx.random.key(tokens))
        idx = mx.array(rng.integers(0, experts, (tokens, 4)), dtype=mx.uint32)
        out = _core.gather_qmm(x, w, s, b, rhs_indices=idx, group_size=gs, bits=bits, mode=mode)
        ref = mx.gather_qmm(x, w, s, b, rhs_indices=idx, group_size=gs, bits=bits, mode=mode)
        assert out.shape == ref.shape == (tokens, 4, 1, n)
        x64 = np.array(x).astype(np.float64).reshape(tokens, k)
        want = np.einsum("tk,tjnk->tjn", x64, w64[np.array(idx)])
        np.testing.assert_allclose(np.array(out)[:, :, 0], want, rtol=1e-4, atol=1e-4)
        # sorted: one row per pair, grouped by expert
        flat = np.array(idx).reshape(-1)
        order = np.argsort(flat, kind="stable")
        xs = mx.array(np.repeat(x64, 4, axis=0)[order].astype(np.float32))[:, None, :]
        si = mx.array(flat[order], dtype=mx.uint32)
        out = _core.gather_qmm(
            xs, w, s, b, rhs_indices=si, group_size=gs, bits=bits, mode=mode, sorted_indices=True
        )
        want = np.einsum("pk,pnk->pn", np.array(xs[:, 0]).astype(np.float64), w64[flat[order]])
        np.testing.assert_allclose(np.array(out)[:, 0], want, rtol=1e-4, atol=1e-4)


def test_gather_qmm_lhs_indices_and_plain_layout():
    gs, experts, k, n = 32, 4, 64, 96
    w, s, b = quantized((experts, k, n), "affine", 4, gs, 13)  # transpose=False: (E, K, N)
    x = mx.random.normal((3, 2, k))
    lhs = mx.array([0, 2, 1, 0, 2], mx.uint32)
    rhs = mx.array([1, 1, 3, 0, 2], mx.uint32)
    out = _core.gather_qmm(x, w, s, b, lhs, rhs, transpose=False, group_size=gs, bits=4)
    ref = mx.gather_qmm(x, w, s, b, lhs, rhs, transpose=False, group_size=gs, bits=4)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
    # batched weights in quantized_matmul go to MLX's op: same answer
    xb = mx.random.normal((experts, 2, k))
    out = _core.quantized_matmul(xb, w, s, b, transpose=False, group_size=gs, bits=4)
    ref = mx.quantized_matmul(xb, w, s, b, transpose=False, group_size=gs, bits=4)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,bits,gs", [("mxfp8", 8, 32), ("nvfp4", 4, 16)])
def test_other_modes_fall_back_to_mlx(mode, bits, gs):
    # (affine 2/3/5/6-bit weights run on our kernels: tests/test_gguf_kquants.py)
    assert not _core.quant_supported(mode, bits, gs)
    w, s, b = quantized((64, 128), mode, bits, gs, bits)
    x = mx.random.normal((2, 128))
    out = _core.quantized_matmul(x, w, s, b, group_size=gs, bits=bits, mode=mode)
    ref = mx.quantized_matmul(x, w, s, b, group_size=gs, bits=bits, mode=mode)
    assert mx.array_equal(out, ref)


def test_bad_arguments_are_mlx_errors():
    w, s, b = quantized((64, 128), "affine", 4, 64, 1)
    with pytest.raises(ValueError, match="quantized_matmul"):
        _core.quantized_matmul(mx.zeros((2, 100)), w, s, b, group_size=64)
    with pytest.raises(ValueError, match="quantized_matmul"):
        _core.quantized_matmul(mx.zeros((2, 128)), w, s, b, group_size=32)
    with pytest.raises(ValueError):
        _core.quantized_matmul(mx.zeros((2, 128)), w.astype(mx.float32), s, b, group_size=64)
    with pytest.raises(ValueError):
        _core.set_quant_isa("no-such-isa")
    with pytest.raises(ValueError):
        _core.set_quant_threads(0)


def test_grad_and_compile_follow_mlx():
    w, s, b = quantized((64, 128), "affine", 4, 32, 2)
    x = mx.random.normal((3, 128))
    ours = mx.grad(lambda v: _core.quantized_matmul(v, w, s, b, group_size=32).sum())(x)
    mlx = mx.grad(lambda v: mx.quantized_matmul(v, w, s, b, group_size=32).sum())(x)
    np.testing.assert_allclose(np.array(ours), np.array(mlx), rtol=1e-5, atol=1e-5)
    f = mx.compile(lambda v: _core.quantized_matmul(v, w, s, b, group_size=32) * 2)
    np.testing.assert_allclose(
        np.array(f(x)),
        np.array(mx.quantized_matmul(x, w, s, b, group_size=32) * 2),
        rtol=1e-4,
        atol=1e-4,
    )


def test_threads_and_paths_agree():
    """1, 2 or 3 threads, GEMV or BLAS tiles: the same answer within rounding."""
    w, s, b = quantized((3000, 256), "affine", 4, 64, 9)
    x = mx.random.normal((8, 256))
    _core.set_quant_threads(1)
    base = np.array(_core.quantized_matmul(x, w, s, b))
    for threads in (2, 3):
        _core.set_quant_threads(threads)
        np.testing.assert_array_equal(np.array(_core.quantized_matmul(x, w, s, b)), base)
    _core.set_quant_gemm_rows(1)  # every call through dequantized tiles and the BLAS
    np.testing.assert_allclose(
        np.array(_core.quantized_matmul(x, w, s, b)), base, rtol=1e-4, atol=1e-4
    )


# (bits, group, scale dtype): each GEMV kernel family (4/8-bit bytes, the 2..8-bit stream
# with groups of 16 and up) and each stored scale type; MXFP4 through mx.quantize.
GEMV_LAYOUTS = [
    (4, 32, mx.float16),
    (4, 128, mx.bfloat16),
    (8, 64, mx.float32),
    (2, 16, mx.float32),
    (3, 16, mx.float32),
    (4, 16, mx.float16),
    (5, 32, mx.float16),
    (6, 16, mx.float32),
    (6, 128, mx.bfloat16),
    ("mxfp4", 32, mx.uint8),
]


def _random_layout(rng, bits, gs, dtype, n, k):
    """Random codes, scales and biases of an affine layout (MXFP4: mx.quantize) and its
    weights as float64."""
    if bits == "mxfp4":
        w, s = mx.quantize(
            mx.array(rng.standard_normal((n, k)).astype(np.float32)),
            group_size=gs,
            bits=4,
            mode="mxfp4",
        )
        w64 = np.array(mx.dequantize(w, s, group_size=gs, bits=4, mode="mxfp4", dtype=mx.float32))
        return (w, s, None), w64.astype(np.float64)
    from mlx_harmony_core.models.gguf_kquants import pack_bits

    codes = rng.integers(0, 2**bits, (n, k))
    w = np.ascontiguousarray(pack_bits(codes, bits)).view(np.uint32)
    s = mx.array(rng.uniform(-0.1, 0.1, (n, k // gs)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.uniform(-0.5, 0.5, (n, k // gs)).astype(np.float32)).astype(dtype)
    s64 = np.repeat(np.array(s.astype(mx.float32)).astype(np.float64), gs, axis=1)
    b64 = np.repeat(np.array(b.astype(mx.float32)).astype(np.float64), gs, axis=1)
    return (mx.array(w), s, b), codes * s64 + b64


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,gs,dtype", GEMV_LAYOUTS)
@pytest.mark.parametrize("groups", [3, 67])  # odd group counts; 67 crosses the 64-group chunk
def test_gemv_every_row_count(isa, bits, gs, dtype, groups):
    """x rows 1..16 against 37 output rows: within float32 rounding of float64, and each x
    row's result bit-identical whatever the number of rows beside it (a batch of decode rows
    equals each row alone) and however many threads split the output rows."""
    _core.set_quant_isa(isa)
    rng = np.random.default_rng(groups * 100 + gs + (bits if isinstance(bits, int) else 9))
    if isinstance(bits, int) and groups * gs * bits % 32:
        groups += 1  # whole uint32 words of codes per row (3-bit groups of 16 come in pairs)
    k, n = groups * gs, 37
    (w, s, b), w64 = _random_layout(rng, bits, gs, dtype, n, k)
    mode, qbits = ("mxfp4", 4) if bits == "mxfp4" else ("affine", bits)
    assert _core.quant_supported(mode, qbits, gs)
    x = mx.array(rng.standard_normal((16, k)).astype(np.float32))
    x64 = np.array(x).astype(np.float64)

    def matmul(rows):
        return np.array(_core.quantized_matmul(rows, w, s, b, True, gs, qbits, mode))

    alone = np.concatenate([matmul(x[r : r + 1]) for r in range(16)])
    check_close(mx.array(alone), x64, w64, True)
    before = _core.quant_parallel_bytes()
    try:
        for threads, parallel_bytes in ((1, before), (2, 0)):  # 2: split into row blocks
            _core.set_quant_threads(threads)
            _core.set_quant_parallel_bytes(parallel_bytes)
            for rows in range(1, 17):
                out = matmul(x[:rows])
                check_close(mx.array(out), x64[:rows], w64, True)
                if rows < _core.quant_gemm_rows():  # the fused GEMV, not BLAS tiles
                    np.testing.assert_array_equal(out, alone[:rows])
    finally:
        _core.set_quant_parallel_bytes(before)


def test_concurrent_callers():
    """Two threads (each with its own MLX stream) share the kernel pool safely."""
    w, s, b = quantized((2048, 512), "affine", 8, 64, 4)
    xs = [mx.random.normal((2, 512), key=mx.random.key(i)) for i in range(2)]
    mx.eval(xs)
    want = [np.array(mx.quantized_matmul(x, w, s, b, bits=8)) for x in xs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(30):
                got = np.array(_core.quantized_matmul(xs[i], w, s, b, bits=8))
                np.testing.assert_allclose(got, want[i], rtol=1e-4, atol=1e-4)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.fixture(scope="module", params=["4", "8", "mxfp4", "mxfp4-q8"])
def quantized_demo(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / f"demo-{request.param}"
    mhc.make_test_model(path, preset="demo", quantize=request.param)
    return request.param, path


def test_quantized_demo_model(quantized_demo):
    """Loading switches the quantized layers; logits equal MLX's path; 200 greedy tokens."""
    q, path = quantized_demo
    ours, theirs = mhc.load(path), mhc.load(path)
    assert quant.switched_layers(ours.model) > 0
    kinds = {type(m).__name__ for _, m in ours.model.named_modules()}
    assert "FastQuantizedSwitchLinear" in kinds
    if q != "mxfp4":  # MXFP4 checkpoints quantize only the experts
        assert {"FastQuantizedLinear", "FastQuantizedEmbedding"} <= kinds
    else:
        assert isinstance(ours.model.lm_head, nn.Linear)
    x = mx.array([list(range(300, 700))])
    a = ours.model(x)
    with quant.kernels(False):
        b = theirs.model(x)
    rel = float(mx.abs(a - b).max() / mx.abs(b).max())
    assert rel < 1e-3
    params = mhc.SamplingParams(temperature=0)
    msgs = [{"role": "user", "content": "Count to twenty."}]
    r1 = ours.generate(msgs, params=params, max_tokens=200)
    with quant.kernels(False):
        r2 = theirs.generate(msgs, params=params, max_tokens=200)
    assert r1.usage.completion_tokens == r2.usage.completion_tokens
    assert r1.text == r2.text


def test_backend_info_and_switch_off(quantized_demo, monkeypatch):
    _, path = quantized_demo
    info = mhc.backend_info()
    assert info["quant_kernels"] == "mlx-harmony-core"
    assert info["quant_isa"] in ISAS and info["quant_threads"] >= 1
    monkeypatch.setenv(quant.ENV, "mlx")
    assert mhc.backend_info()["quant_kernels"].startswith("mlx (")
    engine = mhc.load(path)
    assert quant.switched_layers(engine.model) == 0


def test_big_models_are_written_layer_by_layer(tmp_path, monkeypatch):
    from mlx_harmony_core.models import builder

    whole = mhc.make_test_model(tmp_path / "one", quantize="mxfp4-q8")
    monkeypatch.setattr(builder, "_SHARD_PARAMS", 0)
    parts = mhc.make_test_model(tmp_path / "parts", quantize="mxfp4-q8")
    files = sorted(p.name for p in parts.glob("model-*.safetensors"))
    assert len(files) == 3 and (parts / "model.safetensors.index.json").exists()  # 2 layers + rest
    x = mx.array([[1, 2, 3, 4]])
    a, b = mhc.load(whole).model(x), mhc.load(parts).model(x)
    assert mx.array_equal(a, b)


def test_make_test_model_rejects_bad_quantization(tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of"):
        mhc.make_test_model(tmp_path / "a", quantize="3")
    with pytest.raises(ValueError, match="group_size"):
        mhc.make_test_model(tmp_path / "b", quantize="4", group_size=48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        mhc.make_test_model(tmp_path / "c", quantize="4", group_size=128)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_real_model_on_our_kernels(smollm2_path):
    """SmolLM2's Q4_1 GGUF: our kernels' logits equal MLX's path; greedy tokens identical."""
    ours = mhc.load(smollm2_path)
    assert quant.switched_layers(ours.model) > 0
    prompt = mx.array([[1, 504, 3458, 282, 4649, 314, 2]])
    a = ours.model(prompt)
    with quant.kernels(False):
        b = ours.model(prompt)
    assert float(mx.abs(a - b).max() / mx.abs(b).max()) < 1e-3
    params = mhc.SamplingParams(temperature=0)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r1 = ours.generate(msgs, params=params, max_tokens=24)
    theirs = mhc.load(smollm2_path)
    with quant.kernels(False):
        r2 = theirs.generate(msgs, params=params, max_tokens=24)
    assert r1.text == r2.text
