"""Shared benchmark setup: CPU device, a private home, and an ours-vs-mlx-lm ratio table.

Every benchmark sets ``benchmark.group`` to its case and ``benchmark.extra_info["engine"]`` to
"ours" or "mlx_lm"; at the end we print median(mlx_lm) / median(ours) per case (> 1: we are
faster). With ``--benchmark-disable`` each benchmark runs once, as a test.
"""

import os
import statistics
import tempfile

os.environ.setdefault("MLX_HARMONY_CORE_HOME", tempfile.mkdtemp(prefix="mhc-bench-home-"))

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402


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
        (case, v["ours"], v["mlx_lm"])
        for case, v in sorted(cases.items())
        if {"ours", "mlx_lm"} <= v.keys()
    ]
    if not rows:
        return
    tr = terminalreporter
    tr.section("ours vs mlx-lm (median per call; speed-up = mlx-lm / ours)")
    tr.write_line(f"{'case':58s} {'ours':>12s} {'mlx-lm':>12s} {'speed-up':>9s}")
    for case, ours, theirs in rows:
        tr.write_line(
            f"{case:58s} {ours * 1e3:10.3f}ms {theirs * 1e3:10.3f}ms {theirs / ours:8.1f}x"
        )
