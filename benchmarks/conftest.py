"""Shared benchmark setup: CPU device, a private home, and an ours-vs-mlx-lm ratio table.

Every benchmark sets ``benchmark.group`` to its case and ``benchmark.extra_info["engine"]`` to
"ours" or a baseline ("mlx_lm", ...); at the end we print median(baseline) / median(ours) per
case (> 1: we are faster). With ``--benchmark-disable`` each benchmark runs once, as a test.
"""

import atexit
import os
import shutil
import statistics
import tempfile

if "MLX_HARMONY_CORE_HOME" not in os.environ:  # ours: removed at exit (~220 MB a run)
    _home = tempfile.mkdtemp(prefix="mhc-bench-home-")
    os.environ["MLX_HARMONY_CORE_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)

import mlx_harmony_core  # noqa: E402,F401,I001  (before mlx.core: it routes MLX's BLAS)

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    from mlx_harmony_core.testing import real_model_or_skip

    return real_model_or_skip("smollm2")


@pytest.fixture(autouse=True)
def _cpu():
    mx.set_default_device(mx.cpu)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    cases: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        engine = bench.extra_info.get("engine")
        if engine and bench.stats and bench.stats.data:
            cases.setdefault(bench.group or bench.name, {})[engine] = statistics.median(
                bench.stats.data
            )
    rows = [
        (case, v["ours"], other, t)
        for case, v in sorted(cases.items())
        if "ours" in v
        for other, t in sorted(v.items())
        if other != "ours"
    ]
    if not rows:
        return
    tr = terminalreporter
    tr.section("ours vs baselines (median per call; speed-up = baseline / ours)")
    tr.write_line(f"{'case':48s} {'ours':>11s} {'baseline':>14s} {'time':>11s} {'speed-up':>9s}")
    for case, ours, other, theirs in rows:
        tr.write_line(f"{case:48s} {_fmt(ours)} {other:>14s} {_fmt(theirs)} {theirs / ours:8.1f}x")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:9.2f}us" if seconds < 1e-3 else f"{seconds * 1e3:9.3f}ms"


# Rows printed by benchmarks that measure in subprocesses (bench_blas.py).
SUBPROCESS_ROWS: list[tuple[str, str, float, float]] = []


# Rows of bench_server.py: (case, engine, requests/s, mean TTFT in seconds).
SERVER_ROWS: list[tuple[str, str, float, float]] = []


# Rows of bench_speculative.py: (case, engine, decode tok/s, ratio to our plain decoding).
SPEC_ROWS: list[tuple[str, str, str, str]] = []


# Rows of bench_real.py: (engine and weights, prefill tok/s, decode tok/s, decode min-max).
REAL_ROWS: list[tuple[str, str, str, str]] = []


# Rows of bench_structured.py: (case, measurement).
STRUCTURED_ROWS: list[tuple[str, str]] = []


# Rows of bench_batching.py: (case, server, one dict of metrics per round).
BATCH_ROWS: list[tuple[str, str, list[dict[str, float]]]] = []

# (case, ours, MLX's kernels, unit): quantized matmul kernels vs MLX's CPU path.
QUANT_ROWS: list[tuple[str, float, float, str]] = []

# (engine, one dict per run: open/ready seconds, peak/rss/base bytes, file bytes): GGUF loads.
LOAD_ROWS: list[tuple[str, list[dict[str, float]], int]] = []

# (case, 2 ranks, 1 rank, unit): tensor parallelism on this machine.
DIST_ROWS: list[tuple[str, float, float, str]] = []
DIST_BATCH_ROWS: list[tuple[str, float, float, str]] = []


def _spread(values: list[float], scale: float = 1.0) -> str:
    v = sorted(x * scale for x in values)
    return f"{v[0]:7.1f} {statistics.median(v):7.1f} {v[-1]:7.1f}"


def _pairs(tr, rows, title, names, ratio=False):
    """A section of (case, value, baseline, unit) rows; a row without a unit is a note."""
    if not rows:
        return
    tr.section(title)
    head = f"{'case':52s} {names[0]:>9s} {names[1]:>9s} {'unit':>8s}"
    tr.write_line(head + (f" {'ratio':>7s}" if ratio else ""))
    for case, value, base, unit in rows:
        if not unit:
            tr.write_line(case)
            continue
        line = f"{case:52s} {value:9.2f} {base:9.2f} {unit:>8s}"
        if ratio:
            line += f" {value / base:6.1f}x" if base else "       -"
        tr.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    if SPEC_ROWS:
        tr.section("speculative decoding: decode tok/s, medians (ratio to our plain decoding)")
        for case, name, tps, ratio in SPEC_ROWS:
            tr.write_line(f"{case:36s} {name:24s} {tps} {ratio}")
    if REAL_ROWS:
        tr.section("SmolLM2-135M-Instruct (real weights): medians over alternating runs")
        tr.write_line(f"{'engine (weights)':28s} {'prefill':>8s} {'decode':>8s}  decode min-max")
        for label, prefill, decode, spread in REAL_ROWS:
            tr.write_line(f"{label:28s} {prefill:>8s} {decode:>8s}  {spread}")
    _pairs(
        tr,
        QUANT_ROWS,
        "quantized kernels on the CPU: ours vs MLX's, medians, same run",
        ("ours", "MLX"),
        ratio=True,
    )
    _pairs(
        tr,
        DIST_ROWS,
        "distributed (ring, 127.0.0.1): 2 ranks vs 1 rank on the same 2 cores",
        ("2 ranks", "1 rank"),
    )
    _pairs(
        tr,
        DIST_BATCH_ROWS,
        "a 2-rank group serving concurrent clients: batched vs one at a time, same run",
        ("batched", "one/time"),
        ratio=True,
    )
    if LOAD_ROWS:
        tr.section("loading a GGUF: min / median / max over alternating runs, one process each")
        tr.write_line(
            f"{'engine':22s} {'ready (load + 1 token) s':>24s} {'open s':>23s} "
            f"{'peak RSS GiB':>23s} {'RSS after GiB':>23s} {'CPU s (load+1 token)':>23s}"
        )
        for name, runs, _size in LOAD_ROWS:
            if not runs:
                tr.write_line(name)
                continue
            tr.write_line(
                f"{name:22s} {_spread([r['ready'] for r in runs])} "
                f"{_spread([r['open'] for r in runs])} "
                f"{_spread([r['peak'] for r in runs], 2**-30)} "
                f"{_spread([r['rss'] for r in runs], 2**-30)} "
                f"{_spread([r.get('cpu', 0.0) for r in runs])}"
            )
        tr.write_line(f"file: {LOAD_ROWS[-1][2] / 1e9:.1f} GB")
    if STRUCTURED_ROWS:
        tr.section("structured outputs (demo model unless named)")
        for case, value in STRUCTURED_ROWS:
            tr.write_line(f"{case:36s} {value}")
    if BATCH_ROWS:
        tr.section("batching servers: min / median / max over alternating rounds")
        tr.write_line(
            f"{'case':22s} {'server':>12s} {'aggregate tok/s':>23s} {'req/s':>23s} "
            f"{'TTFT p50 ms':>23s} {'TTFT p95 ms':>23s}"
        )
        for case, server, runs in BATCH_ROWS:
            tr.write_line(
                f"{case:22s} {server:>12s} {_spread([r['tok_s'] for r in runs])} "
                f"{_spread([r['req_s'] for r in runs])} "
                f"{_spread([r['ttft_p50'] for r in runs], 1e3)} "
                f"{_spread([r['ttft_p95'] for r in runs], 1e3)}"
            )
    if SERVER_ROWS:
        tr.section("server: requests/s and mean time to first token")
        tr.write_line(f"{'case':52s} {'engine':>9s} {'req/s':>8s} {'TTFT':>10s}")
        for case, engine, rps, ttft in SERVER_ROWS:
            tr.write_line(f"{case:52s} {engine:>9s} {rps:8.2f} {ttft * 1e3:8.1f}ms")
    if not SUBPROCESS_ROWS:
        return
    tr.section("OpenBLAS shim on vs off (MLX reference BLAS), same machine, same run")
    tr.write_line(f"{'case':44s} {'unit':>8s} {'shim on':>10s} {'off':>10s} {'ratio':>7s}")
    for case, unit, on, off in SUBPROCESS_ROWS:
        tr.write_line(f"{case:44s} {unit:>8s} {on:10.2f} {off:10.2f} {on / off:6.1f}x")
