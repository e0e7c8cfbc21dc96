"""gpt-oss-20b's shapes, random weights, MXFP4 experts and 8-bit elsewhere (~13 GB, like
mlx-community's MXFP4-Q8 conversion): decode on this machine, ours vs MLX's kernels.

    MHC_BENCH_20B=1 python -m pytest benchmarks/bench_gpt_oss_20b.py -s

On demand only (never in CI): the model is built once (a few minutes, written layer by
layer) into ``$MLX_HARMONY_CORE_HOME/models/gpt-oss-20b-mxfp4-q8-random``.
"""

import os
import time

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from conftest import QUANT_ROWS
from mlx_harmony_core._paths import home
from mlx_harmony_core.bench import forward_tokens_per_s
from mlx_harmony_core.cpu import quant

pytestmark = pytest.mark.skipif(
    not os.environ.get("MHC_BENCH_20B"), reason="set MHC_BENCH_20B=1 (builds a 13 GB model)"
)


def test_gpt_oss_20b_shapes_mxfp4():
    path = home() / "models" / "gpt-oss-20b-mxfp4-q8-random"
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        mhc.make_test_model(path, preset="gpt-oss-20b", quantize="mxfp4-q8")
        QUANT_ROWS.append(("gpt-oss-20b shapes: build once", time.perf_counter() - t0, 0, "s"))
    mx.reset_peak_memory()
    engine = mhc.load(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    prompt = list(range(1000, 1032))
    ours = forward_tokens_per_s(engine.model, prompt, steps=8)
    peak = mx.get_peak_memory() / 2**30
    with quant.kernels(False):
        theirs = forward_tokens_per_s(engine.model, prompt, steps=2)
    QUANT_ROWS.append(("gpt-oss-20b shapes MXFP4-Q8: decode forward pass", ours, theirs, "tok/s"))
    QUANT_ROWS.append((f"gpt-oss-20b shapes: weights on disk {size:.1f} GiB, peak", peak, 0, "GiB"))
