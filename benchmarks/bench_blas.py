"""MLX's CPU matrix products with the OpenBLAS shim on vs off (reference BLAS), same run.

    python -m pytest benchmarks/bench_blas.py          # demo + small (~0.24B) models
    MHC_BENCH_MID=1 python -m pytest benchmarks/bench_blas.py   # + mid (~0.84B), slow

The BLAS is chosen at import, so each side runs in its own subprocess and reports its own
median; the table at the end gives the ratios. Decode memory bandwidth is the bytes of the
weights a token reads (all dense weights + the active experts) times tokens/s.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import SUBPROCESS_ROWS

CHILD = r"""
import json, sys, time, statistics
import mlx_harmony_core as mhc
import mlx.core as mx
what, arg, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])

def timeit(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)

out = {"blas": mhc.backend_info()["blas"]}
if what == "gemm":
    n = int(arg); a, b = mx.random.normal((n, n)), mx.random.normal((n, n)); mx.eval(a, b)
    out["value"] = 2 * n**3 / timeit(lambda: mx.eval(a @ b), reps) / 1e9
elif what == "matvec":
    n = int(arg); a, x = mx.random.normal((n, n)), mx.random.normal((n, 1)); mx.eval(a, x)
    out["value"] = 4 * n * n / timeit(lambda: mx.eval(a @ x), reps) / 1e9
else:
    from mlx_lm.models.cache import make_prompt_cache
    engine = mhc.load(arg)
    model, cfg = engine.model, engine.config
    prompt = mx.array([[(i * 7919) % 199990 for i in range(int(what.split(":")[1]))]])
    def prefill():
        cache = make_prompt_cache(model); mx.eval(model(prompt, cache=cache)); return cache
    if what.startswith("prefill"):
        out["value"] = prompt.shape[1] / timeit(prefill, reps)
    else:
        cache = prefill(); y = mx.array([[1]])
        def step():
            mx.eval(model(y, cache=cache))
        n = 16
        out["value"] = n / timeit(lambda: [step() for _ in range(n)], reps)
        h, e = cfg["hidden_size"], cfg["intermediate_size"]
        dense = sum(v.size for k, v in __import__("mlx.utils", fromlist=["x"]).tree_flatten(model.parameters()) if "experts" not in k)
        active = cfg["num_hidden_layers"] * cfg["num_experts_per_tok"] * 3 * h * e
        out["gbps"] = out["value"] * 4 * (dense - cfg["vocab_size"] * h + active) / 1e9
print(json.dumps(out))
"""


def child(what, arg, reps, blas):
    env = {**os.environ, "MLX_HARMONY_CORE_BLAS": blas}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(arg), str(reps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(benchmark, case, unit, what, arg, reps):
    quick = benchmark.disabled  # in the test suite: one small run, just to prove it works
    reps = 1 if quick else reps
    on = benchmark.pedantic(child, args=(what, arg, reps, "openblas"), rounds=1, iterations=1)
    off = child(what, arg, reps, "reference")
    assert on["blas"] == "openblas" and off["blas"] == "reference"
    if not quick:
        SUBPROCESS_ROWS.append((case, unit, on["value"], off["value"]))
        if "gbps" in on:
            SUBPROCESS_ROWS.append((case + " (weights read)", "GB/s", on["gbps"], off["gbps"]))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    import mlx_harmony_core as mhc

    return mhc.make_test_model(tmp_path_factory.mktemp("m") / "small", preset="small")


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    import mlx_harmony_core as mhc

    return mhc.make_test_model(tmp_path_factory.mktemp("m") / "mid", preset="mid")


def test_gemm(benchmark):
    compare(
        benchmark,
        "float32 GEMM 1024^3",
        "GFLOP/s",
        "gemm",
        1024 if not benchmark.disabled else 64,
        10,
    )


def test_matvec(benchmark):
    compare(
        benchmark,
        "float32 matvec 4096x4096",
        "GB/s",
        "matvec",
        4096 if not benchmark.disabled else 64,
        20,
    )


@pytest.mark.parametrize("phase", ["prefill:128", "decode:128"])
def test_demo_model(benchmark, phase):
    compare(
        benchmark, f"demo model {phase.replace(':', ' after ')} tokens", "tok/s", phase, "demo", 5
    )


@pytest.mark.parametrize("phase", ["prefill:128", "decode:128"])
def test_small_model(benchmark, phase, request):
    if benchmark.disabled:
        pytest.skip("builds a 0.24B model: run the benchmarks without --benchmark-disable")
    compare(
        benchmark,
        f"small model (0.24B) {phase.replace(':', ' after ')}",
        "tok/s",
        phase,
        request.getfixturevalue("small_model"),
        3,
    )


@pytest.mark.parametrize("phase", ["prefill:128", "decode:128"])
def test_mid_model(benchmark, phase, request):
    if benchmark.disabled or not os.environ.get("MHC_BENCH_MID"):
        pytest.skip("set MHC_BENCH_MID=1 for the 0.84B model (minutes, ~7 GB of RAM)")
    compare(
        benchmark,
        f"mid model (0.84B) {phase.replace(':', ' after ')}",
        "tok/s",
        phase,
        request.getfixturevalue("mid_model"),
        2,
    )
