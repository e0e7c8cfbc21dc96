"""The GGUF block kernels (Q8_0, MXFP4 computed on GGUF's own layout) against the ``gguf``
package's dequantizer and a float64 matmul: random blocks, odd shapes, both the GEMV and the
BLAS-tile route, every instruction set this CPU has, bad inputs; and arrays over a mapped
file (views, kept alive by the arrays)."""

import gc

import mlx.core as mx
import numpy as np
import pytest

from mlx_harmony_core import _core

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

BLOCK = {8: 34, 39: 17}
ISAS = _core.gguf_block_isas()


def _blocks(kind, rows, cols, rng):
    """Random GGUF blocks: Q8_0 scales random finite halves (some subnormal, some zero),
    MXFP4 exponents across the range (0 and 1: subnormal scales)."""
    nb = cols // 32
    b = rng.integers(0, 256, (rows, nb, BLOCK[kind]), dtype=np.uint8)
    if kind == 8:
        d = rng.uniform(-0.1, 0.1, (rows, nb)).astype(np.float16)
        special = np.array([0, 2e-7, -6e-5], np.float16)[: d.size]
        d.reshape(-1)[: special.size] = special
        b[..., :2] = d.view(np.uint8).reshape(rows, nb, 2)
    else:
        b[..., 0] = rng.integers(110, 140, (rows, nb))
        first = b.reshape(-1, BLOCK[kind])[:2, 0]
        first[:] = [0, 1][: first.size]
    return b.reshape(rows, nb * BLOCK[kind])


def _ref(kind, w):
    return dequantize(w, Q(kind)).astype(np.float64)


@pytest.fixture(params=ISAS)
def isa(request):
    before = _core.gguf_block_isa()
    _core.set_gguf_block_isa(request.param)
    yield request.param
    _core.set_gguf_block_isa(before)


@pytest.mark.parametrize("kind", [8, 39])
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        (1, 1, 32),
        (1, 37, 64),
        (3, 70, 96),
        (5, 33, 160),
        (17, 129, 96),
        (40, 65, 320),
        (1, 3, 224),  # odd block counts: the kernels take blocks in pairs
        (2, 7, 2880),  # a gpt-oss row
        (6, 5, 288),
    ],
)
def test_matmul_equals_dequantized_float64(isa, kind, m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    w = _blocks(kind, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = x.astype(np.float64) @ _ref(kind, w).T
    got = np.array(_core.gguf_matmul(mx.array(x), mx.array(w), kind))
    scale = np.abs(x).astype(np.float64) @ np.abs(_ref(kind, w)).T + 1e-30
    assert got.shape == (m, n)
    assert np.all(np.abs(got - want) <= 1e-5 * scale)
    deq = np.array(_core.gguf_dequantize(mx.array(w), kind))
    assert np.array_equal(deq, dequantize(w, Q(kind)))


@pytest.mark.parametrize("kind", [8, 39])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_inputs_give_their_dtype(kind, dtype):
    rng = np.random.default_rng(1)
    w = _blocks(kind, 9, 64, rng)
    x = mx.array(0.01 * rng.standard_normal((2, 3, 64)).astype(np.float32)).astype(dtype)
    got = _core.gguf_matmul(x, mx.array(w), kind)
    assert got.dtype == dtype and got.shape == (2, 3, 9)
    want = np.array(x.astype(mx.float32)).astype(np.float64) @ _ref(kind, w).T
    tol = 1e-2 * np.abs(want).max()
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), want, rtol=1e-2, atol=tol)


@pytest.mark.parametrize("kind", [8, 39])
@pytest.mark.parametrize("rows", [1, 4, 40])  # a decode step, a few, a prefill (BLAS tiles)
def test_gather_equals_gather_mm_of_dequantized(isa, kind, rows):
    rng = np.random.default_rng(rows)
    experts, n, k = 6, 40, 96
    w = np.stack([_blocks(kind, n, k, rng) for _ in range(experts)])
    x = rng.standard_normal((rows, 1, 1, k)).astype(np.float32)
    idx = rng.integers(0, experts, (rows, 3)).astype(np.int32)
    got = np.array(_core.gguf_gather_matmul(mx.array(x), mx.array(w), mx.array(idx), kind))
    dense = np.stack([_ref(kind, w[e]) for e in range(experts)])
    want = np.einsum("rk,rjnk->rjn", x[:, 0, 0].astype(np.float64), dense[idx])[:, :, None, :]
    assert got.shape == (rows, 3, 1, n)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # mlx-lm's sorted form: (T*k, 1, D) rows with (T*k,) indices
    xs = np.repeat(x[:, 0], 3, axis=0)
    got2 = np.array(
        _core.gguf_gather_matmul(mx.array(xs), mx.array(w), mx.array(idx.reshape(-1)), kind)
    )
    np.testing.assert_allclose(got2.reshape(rows, 3, 1, n), got, rtol=1e-5, atol=1e-5)


@pytest.fixture
def gemv_settings():
    before = (_core.quant_gemm_rows(), _core.quant_parallel_bytes())
    yield
    _core.set_quant_gemm_rows(before[0])
    _core.set_quant_parallel_bytes(before[1])


@pytest.mark.parametrize("kind", [8, 39])
@pytest.mark.parametrize("parallel", [False, True])
def test_one_x_row_is_bit_identical_alone_or_among_others(isa, kind, parallel, gemv_settings):
    """Every GEMV path (x rows in groups of 4 and the rest, odd block counts, the
    thread pool's row ranges) uses one arithmetic order per row of x."""
    _core.set_quant_gemm_rows(17)  # nx 1..16 all through the GEMV
    _core.set_quant_parallel_bytes(0 if parallel else 1 << 40)
    rng = np.random.default_rng(kind + parallel)
    w = mx.array(_blocks(kind, 37, 288, rng))
    x = rng.standard_normal((16, 288)).astype(np.float32)
    alone = np.concatenate(
        [np.array(_core.gguf_matmul(mx.array(x[i : i + 1]), w, kind)) for i in range(16)]
    )
    for nx in range(1, 17):
        got = np.array(_core.gguf_matmul(mx.array(x[:nx]), w, kind))
        assert np.array_equal(got, alone[:nx]), nx
    # the gather route: several rows on one expert, one row on another
    w3 = mx.stack([w, w])
    idx = mx.array(np.array([0, 0, 1, 0, 0], np.int32))
    got = np.array(_core.gguf_gather_matmul(mx.array(x[:5, None]), w3, idx, kind))
    assert np.array_equal(got[:, 0], alone[:5])


def test_isas_agree():
    rng = np.random.default_rng(7)
    w, x = _blocks(39, 50, 128, rng), rng.standard_normal((2, 128)).astype(np.float32)
    before, outs = _core.gguf_block_isa(), []
    for name in ISAS:
        _core.set_gguf_block_isa(name)
        outs.append(np.array(_core.gguf_matmul(mx.array(x), mx.array(w), 39)))
    _core.set_gguf_block_isa(before)
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-4)


def test_bad_inputs_are_value_errors():
    w = mx.zeros((4, 34), mx.uint8)
    x = mx.zeros((2, 32))
    with pytest.raises(ValueError, match="no block kernel"):
        _core.gguf_matmul(x, w, 2)
    with pytest.raises(ValueError, match="whole blocks"):
        _core.gguf_matmul(x, mx.zeros((4, 35), mx.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        _core.gguf_matmul(x, mx.zeros((4, 34), mx.int8), 8)
    with pytest.raises(ValueError, match="columns"):
        _core.gguf_matmul(mx.zeros((2, 64)), w, 8)
    with pytest.raises(ValueError, match="float"):
        _core.gguf_matmul(mx.zeros((2, 32), mx.int32), w, 8)
    with pytest.raises(ValueError, match="integers"):
        _core.gguf_gather_matmul(x[:, None], w[None], mx.zeros((2,)), 8)
    with pytest.raises(ValueError, match="not available"):
        _core.set_gguf_block_isa("avx9000")
    if mx.metal.is_available():  # pragma: no cover - Linux CI has no GPU
        with pytest.raises(ValueError, match="CPU"):
            _core.gguf_matmul(x, w, 8, stream=mx.gpu)


def test_mapped_arrays_are_views_kept_alive(tmp_path):
    data = np.arange(4096, dtype=np.float32)
    blocks = _blocks(8, 3, 64, np.random.default_rng(0))
    path = tmp_path / "f.bin"
    path.write_bytes(b"H" * 64 + data.tobytes() + blocks.tobytes())
    mapping = _core.GgufMapping(str(path))
    assert mapping.size == path.stat().st_size
    a = _core.gguf_mapped_array(mapping, 64, [64, 64], "float32")
    w = _core.gguf_mapped_array(mapping, 64 + data.nbytes, [3, 68], "uint8")
    del mapping
    gc.collect()
    assert np.array_equal(np.array(a).reshape(-1), data)
    assert np.array_equal(np.array(w), blocks)
    assert (a * 2)[1, 2].item() == 2 * 66
    x = mx.ones((1, 64))
    np.testing.assert_allclose(
        np.array(_core.gguf_matmul(x, w, 8))[0], _ref(8, blocks).sum(1), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="outside the file"):
        _core.gguf_mapped_array(_core.GgufMapping(str(path)), 64, [10**6], "float32")
    with pytest.raises(ValueError, match="outside the file"):
        _core.gguf_mapped_array(_core.GgufMapping(str(path)), 0, [4], "uint8")
    with pytest.raises(ValueError, match="float32"):
        _core.gguf_mapped_array(_core.GgufMapping(str(path)), 64, [4], "int64")
    with pytest.raises(RuntimeError, match="cannot open"):
        _core.GgufMapping(str(tmp_path / "missing"))
