"""The one CPU primitive class (csrc/primitive): transforms through each op's fallback.

The GGUF block kernels gained gradients and vmap for x this way (MLX's matmuls on the
dequantized weights); the fused ops' own transform tests live in test_fused_ops.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_harmony_core import _core

pytest.importorskip("gguf")
Q8_0 = 8


def _q8_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    nb = cols // 32
    b = rng.integers(0, 256, (rows, nb, 34), dtype=np.uint8)
    d = rng.uniform(-0.1, 0.1, (rows, nb)).astype(np.float16)
    b[..., :2] = d.view(np.uint8).reshape(rows, nb, 2)
    return b.reshape(rows, nb * 34)


def test_gguf_matmul_gradient_and_vmap_follow_the_dequantized_weights():
    rng = np.random.default_rng(0)
    w = mx.array(_q8_0(24, 64, rng))
    deq = _core.gguf_dequantize(w, Q8_0)
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    cot = mx.array(rng.standard_normal((3, 24)).astype(np.float32))
    ours = mx.grad(lambda x: (_core.gguf_matmul(x, w, Q8_0) * cot).sum())(x)
    want = mx.grad(lambda x: ((x @ deq.T) * cot).sum())(x)
    np.testing.assert_allclose(np.array(ours), np.array(want), rtol=1e-5, atol=1e-5)
    mapped = mx.vmap(lambda x: _core.gguf_matmul(x, w, Q8_0))(x[:, None])
    np.testing.assert_allclose(np.array(mapped[:, 0]), np.array(x @ deq.T), rtol=1e-5, atol=1e-5)


def test_gguf_gather_gradient_follows_gather_mm():
    rng = np.random.default_rng(1)
    w = mx.array(np.stack([_q8_0(16, 32, rng) for _ in range(4)]))
    deq = _core.gguf_dequantize(w, Q8_0)
    x = mx.array(rng.standard_normal((5, 1, 32)).astype(np.float32))
    idx = mx.array(rng.integers(0, 4, (5,)).astype(np.int32))
    ours = mx.grad(lambda x: _core.gguf_gather_matmul(x, w, idx, Q8_0).square().sum())(x)
    want = mx.grad(lambda x: mx.gather_mm(x, deq.swapaxes(-1, -2), rhs_indices=idx).square().sum())(
        x
    )
    np.testing.assert_allclose(np.array(ours), np.array(want), rtol=1e-4, atol=1e-4)


def test_equal_parameters_are_one_node_under_compile():
    # is_equivalent: equal names and keys are the same function, so compile may merge them
    rng = np.random.default_rng(2)
    w = mx.array(_q8_0(8, 32, rng))
    x = mx.array(rng.standard_normal((2, 32)).astype(np.float32))
    f = mx.compile(lambda x: _core.gguf_matmul(x, w, Q8_0) + _core.gguf_matmul(x, w, Q8_0))
    np.testing.assert_allclose(
        np.array(f(x)), 2 * np.array(_core.gguf_matmul(x, w, Q8_0)), rtol=1e-6
    )
