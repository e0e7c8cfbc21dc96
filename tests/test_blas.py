"""The OpenBLAS shim: same results as MLX's reference BLAS, and really in use."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the shim is Linux-only")

CHILD = r"""
import sys, json
import mlx_harmony_core as mhc
import mlx.core as mx
import numpy as np
from mlx_harmony_core.cpu import blas as _blas
from mlx_harmony_core.models.builder import demo_model_path

mx.random.seed(0)
out = {}
a, b = mx.random.normal((257, 130)), mx.random.normal((130, 199))
out["matmul"] = a @ b
out["batched"] = mx.random.normal((3, 64, 96)) @ mx.random.normal((3, 96, 33))
out["double"] = mx.matmul(mx.random.normal((40, 50)).astype(mx.float64), mx.random.normal((50, 30)).astype(mx.float64), stream=mx.cpu)
x = mx.random.normal((5, 1, 1, 64))
w = mx.random.normal((8, 48, 64))
idx = mx.random.randint(0, 8, (5, 1, 2))
out["gather_mm"] = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx)
q, k, v = (mx.random.normal((1, 4, 37, 16)) for _ in range(3))
out["attention"] = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
engine = mhc.load(demo_model_path())
out["forward"] = engine.model(mx.array([list(range(100, 164))]))
np.savez(sys.argv[1], **{k: np.array(v) for k, v in out.items()})
print(json.dumps({"blas": mhc.backend_info()["blas"], "calls": _blas.shim_calls()}))
"""


def run_child(path, blas):
    env = {**os.environ, "MLX_HARMONY_CORE_BLAS": blas}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_results_identical_with_shim_on_and_off(tmp_path):
    on = run_child(tmp_path / "on.npz", "openblas")
    off = run_child(tmp_path / "off.npz", "reference")
    assert on["blas"] == "openblas" and on["calls"] > 0  # really in use
    assert off["blas"] == "reference" and off["calls"] == 0
    a, b = np.load(tmp_path / "on.npz"), np.load(tmp_path / "off.npz")
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-4, err_msg=key)


def test_importing_mlx_first_warns_and_keeps_reference():
    code = "import logging; logging.basicConfig(); import mlx.core; import mlx_harmony_core as m; print(m.backend_info()['blas'])"
    env = {k: v for k, v in os.environ.items() if k != "MLX_HARMONY_CORE_BLAS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "reference"
    assert "import mlx_harmony_core first" in out.stderr


def test_info_command():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony_core.cli", "info"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        "blas: openblas" in out.stdout and "mlx: 0.32.4" in out.stdout and "threads:" in out.stdout
    )
