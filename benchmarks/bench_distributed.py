"""Tensor parallelism on one machine: 1 rank vs 2 ring ranks on 127.0.0.1, same model.

    MHC_BENCH_DIST=1 python -m pytest benchmarks/bench_distributed.py -s   # README numbers
    MHC_BENCH_DIST=1 MHC_BENCH_DIST_MAIN=/work/main/.venv/bin/python ...  # + main's group

Two ranks share this machine's two cores, so no speed-up is expected: this reports the
step time with 1 and 2 ranks, each rank's memory, and the time one step spends in
collectives (an all_sum of the hidden state twice per layer, plus the token broadcast).
``test_group_batches_concurrent_clients``: 8 concurrent clients on a 2-rank group,
aggregate tok/s batched vs one request at a time (and vs the group before it batched with
``MHC_BENCH_DIST_MAIN``: a Python whose mlx_harmony_core is main at 960fa24, the last commit
before batching in a group; its rounds all run one request at a time). Without
``MHC_BENCH_DIST`` it runs the demo model briefly, as a test (CI).
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from conftest import DIST_BATCH_ROWS, DIST_ROWS
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


def _group(model: Path, out: Path, args: list[str], python: str = sys.executable) -> dict:
    """``distributed_step.py`` on 2 ring ranks on 127.0.0.1 (started as mlx.launch would)."""
    hosts = out.with_suffix(".hosts.json")
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hosts), "OPENBLAS_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [python, str(STEP), str(model), str(out), *args], env={**env, "MLX_RANK": str(r)}
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
    return json.loads(out.read_text())


@pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="no ring backend")
def test_group_batches_concurrent_clients(tmp_path):
    """8 concurrent clients on a 2-rank group: aggregate decode tok/s batched vs one request
    at a time (what a group did before it batched), alternating rounds in one group.

    ``MHC_BENCH_DIST_MAIN=/path/to/python`` (a Python importing mlx_harmony_core from main
    at 960fa24, before a group batched) also runs that group, alternating launches with
    this one: its "batched" rounds are one at a time too (it refused to batch in a group).
    Both sides run greedy requests: this branch's steps exchange each row's best logit."""
    from mlx_harmony_core.models.builder import demo_model_path

    model = demo_model_path()
    tokens, rounds = ("64", "3") if FULL else ("8", "1")
    args = [tokens, "group", "clients", "8", rounds]
    main = os.environ.get("MHC_BENCH_DIST_MAIN")
    ours, theirs = [], []
    for i in range(int(rounds) if main else 1):
        ours.append(
            _group(model, tmp_path / f"ours{i}.json", [*args[:-1], "1" if main else rounds])
        )
        if main:
            theirs.append(_group(model, tmp_path / f"main{i}.json", [*args[:-1], "1"], main))
    batched = [t for r in ours for t in r["batched"]]
    alone = [t for r in ours for t in r["one_at_a_time"]]
    med = statistics.median
    load = os.getloadavg()[0]
    DIST_BATCH_ROWS.append(
        (
            f"[demo] 8 clients x {tokens} tokens, aggregate (load {load:.1f})",
            med(batched),
            med(alone),
            "tok/s",
        )
    )
    if theirs:
        main_tps = [t for r in theirs for t in r["one_at_a_time"] + r["batched"]]
        DIST_BATCH_ROWS.append(
            ("[demo] ... vs the group before batching", med(batched), med(main_tps), "tok/s")
        )
    assert all(t > 0 for t in batched + alone)
