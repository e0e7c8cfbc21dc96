"""Tensor parallelism on one machine: 1 rank vs 2 ring ranks on 127.0.0.1, same model.

    MHC_BENCH_DIST=1 python -m pytest benchmarks/bench_distributed.py -s   # README numbers

Two ranks share this machine's two cores, so no speed-up is expected: this reports the
step time with 1 and 2 ranks, each rank's memory, and the time one step spends in
collectives (an all_sum of the hidden state twice per layer, plus the token broadcast).
Without ``MHC_BENCH_DIST`` it runs the demo model briefly, as a test (CI).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from conftest import DIST_ROWS
from mlx_harmony_core.testing import free_port

FULL = bool(os.environ.get("MHC_BENCH_DIST"))
STEP = Path(__file__).parent / "distributed_step.py"


@pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="no ring backend")
def test_one_rank_vs_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    if FULL:
        model = tmp / "small"
        mhc.make_test_model(model, preset="small")
    else:
        from mlx_harmony_core.models.builder import demo_model_path

        model = demo_model_path()
    tokens = "64" if FULL else "8"
    one = tmp / "one.json"
    subprocess.run(
        [sys.executable, str(STEP), str(model), str(one), tokens], check=True, timeout=900
    )
    hosts = tmp / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    two = tmp / "two.json"
    procs = [
        subprocess.Popen(
            [sys.executable, str(STEP), str(model), str(two), tokens, "group"],
            env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)},
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    name = "small" if FULL else "demo"
    med = sorted(a["decode_tps"])[1]
    med2 = sorted(b["decode_tps"])[1]
    DIST_ROWS.append((f"[{name} GPT-OSS, float32] decode step", 1e3 / med2, 1e3 / med, "ms"))
    DIST_ROWS.append((f"[{name}] time in collectives per step", b["comm_us"] / 1e3, 0.0, "ms"))
    for r, (mem, w) in enumerate(zip(*b["memory_mb"], strict=True)):
        DIST_ROWS.append((f"[{name}] rank {r}: weights", w, a["memory_mb"][1], "MiB"))
        DIST_ROWS.append((f"[{name}] rank {r}: active memory", mem, a["memory_mb"][0], "MiB"))
