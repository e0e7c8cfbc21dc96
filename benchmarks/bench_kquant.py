"""GGUF K-quant and 5-bit kernels, and llama.cpp's Q4_K_M SmolLM2 against today's Q4_1 file and
llama.cpp on the same file.

    MHC_BENCH_KQUANT=1 python -m pytest benchmarks/bench_kquant.py -s   # the README numbers

GEMV bandwidth: one row against enough matrices to defeat the caches, in GB/s of what the
kernel reads (codes + scales + biases), in the layouts the GGUF types load into, beside the
4-bit Q4_1 layout, as a share of the machine's copy bandwidth measured right before each
layout in every round (medians over rounds), and what 8 rows of x cost against 1. Decode: tokens/s of
forward passes with a cache (Q4_K_M and Q6_K files made by ``make_kquant_smollm2.py``, the
Q4_1 file, and llama.cpp on the Q4_K_M file), alternating. Without ``MHC_BENCH_KQUANT`` each
runs once, tiny, as a test.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import _core
from mlx_harmony_core.bench import copy_bandwidth_gbps, forward_tokens_per_s

logger = logging.getLogger(__name__)

FULL = bool(os.environ.get("MHC_BENCH_KQUANT"))
ROUNDS = int(os.environ.get("MHC_BENCH_ROUNDS", "7")) if FULL else 1
# name -> (bits, group, scale dtype): the layouts GGUF types load into (gguf_kquants.py)
LAYOUTS = {
    "Q4_1 (4-bit g32, f16)": (4, 32, mx.float16),
    "Q5_0/Q5_1 (5-bit g32, f16)": (5, 32, mx.float16),
    "Q4_K (4-bit g32, f32)": (4, 32, mx.float32),
    "Q5_K (5-bit g32, f32)": (5, 32, mx.float32),
    "Q6_K (6-bit g16, f32)": (6, 16, mx.float32),
    "Q3_K (3-bit g16, f32)": (3, 16, mx.float32),
    "Q2_K (2-bit g16, f32)": (2, 16, mx.float32),
}
ROWS: list[tuple[str, float, str]] = []


def _matrices(bits, group, dtype, n, k, count):
    rng = np.random.default_rng(bits * group)
    out = []
    for _ in range(count):
        codes = rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint32)
        s = mx.array(rng.standard_normal((n, k // group)).astype(np.float32)).astype(dtype)
        b = mx.array(rng.standard_normal((n, k // group)).astype(np.float32)).astype(dtype)
        out.append((mx.array(codes), s, b))
    mx.eval(out)
    return out


def _seconds(x, mats, bits, group, passes):
    """Best of ``passes`` passes over every matrix (the least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for w, s, b in mats:
            mx.eval(_core.quantized_matmul(x, w, s, b, True, group, bits))
        best = min(best, time.perf_counter() - t0)
    return best


def gemv_shares(rounds: int, full: bool, passes: int = 3) -> dict[str, tuple[float, float, float]]:
    """Per layout: (median GB/s for 1 row, median share of copy bandwidth, median 8-row /
    1-row time). Each round measures the copy right before each layout's GEMV, so a busy
    neighbour hits both alike; the medians over rounds are what is steady."""
    n, k, count = (4096, 4096, 12) if full else (64, 512, 2)
    passes = passes if full else 1
    sets = {name: _matrices(*spec, n, k, count) for name, spec in LAYOUTS.items()}
    x1 = mx.random.normal((1, k))
    x8 = mx.random.normal((8, k))
    mx.eval(x1, x8)
    got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in LAYOUTS}
    for _ in range(rounds):  # alternating: the shared machine's noise hits every layout alike
        for name, (bits, group, _) in LAYOUTS.items():
            mats = sets[name]
            nbytes = sum(a.nbytes for q in mats for a in q)
            copy = copy_bandwidth_gbps(128 if full else 16)
            one = _seconds(x1, mats, bits, group, passes)
            eight = _seconds(x8, mats, bits, group, passes)
            gbps = nbytes / one / 1e9
            got[name].append((gbps, gbps / copy, eight / one))
    return {
        name: tuple(statistics.median(r[i] for r in v) for i in range(3)) for name, v in got.items()
    }


def test_kquant_gemv_bandwidth():
    for name, (gbps, share, eight) in gemv_shares(ROUNDS, FULL).items():
        ROWS.append(
            (f"GEMV {name}, 1 row", gbps, f"GB/s ({share:.0%} of copy; 8 rows {eight:.2f}x)")
        )
        assert gbps > 0
    ROWS.append((f"ISA {_core.quant_isa()}, {_core.quant_threads()} threads", 0.0, ""))


def _files(smollm2_path: Path) -> dict[str, Path]:
    """The Q4_1 file and llama.cpp's Q4_K_M / Q6_K ones: the user's cache's
    (make_kquant_smollm2.py), else made next to the Q4_1 file (needs llama-cpp-python)."""
    from mlx_harmony_core.models.llama_quantize import kquant_smollm2

    out = {"Q4_1": Path(smollm2_path)}
    made = Path("~/.cache/mlx-harmony-core/models").expanduser()
    for ftype in ("Q4_K_M", "Q6_K"):
        path = made / f"SmolLM2-135M-Instruct.{ftype}.gguf"
        if not path.is_file():
            try:
                path = kquant_smollm2(ftype, Path(smollm2_path).parent)
            except ImportError:
                continue
        out[ftype] = path
    return out


def _llama_decode_tps(path: Path, prompt: list[int], steps: int) -> float:
    from llama_cpp import Llama

    llm = Llama(
        str(path), n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False, use_extra_bufts=False
    )
    llm.eval(prompt)
    llm.eval([prompt[-1]])
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([prompt[-1]])
    return steps / (time.perf_counter() - t0)


def test_smollm2_kquant_decode(smollm2_path):
    files = _files(smollm2_path)
    if "Q4_K_M" not in files:
        pytest.skip("no Q4_K_M SmolLM2: llama-cpp-python is not installed to make one")
    try:
        import llama_cpp  # noqa: F401

        llama = True
    except ImportError:
        llama = False
    engines = {k: mhc.load(p) for k, p in files.items()}
    prompt = list(range(1000, 1000 + (64 if FULL else 8)))
    steps = 32 if FULL else 2
    tps: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        for name, engine in engines.items():
            tps.setdefault(f"ours, {name} file", []).append(
                forward_tokens_per_s(engine.model, prompt, steps)
            )
        if llama:
            tps.setdefault("llama.cpp, Q4_K_M file", []).append(
                _llama_decode_tps(files["Q4_K_M"], prompt, steps)
            )
            tps.setdefault("llama.cpp, Q4_1 file", []).append(
                _llama_decode_tps(files["Q4_1"], prompt, steps)
            )
    base = statistics.median(tps["ours, Q4_1 file"])
    for name, v in tps.items():
        m = statistics.median(v)
        ROWS.append((f"SmolLM2 decode, {name}", m, f"tok/s ({m / base:.2f}x ours Q4_1)"))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if ROWS:
        lines = ["", "K-quant kernels and SmolLM2 K-quant decode (medians):"]
        lines += [f"  {name:52s} {value:10.2f} {unit}" for name, value, unit in ROWS]
        logger.warning("\n".join(lines))
        print("\n".join(lines))  # noqa: T201 - the benchmark's report
