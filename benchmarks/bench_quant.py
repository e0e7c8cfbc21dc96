"""Quantized matmul kernels on the CPU: ours vs MLX's own, in the same run.

    MHC_BENCH_QUANT=1 python -m pytest benchmarks/bench_quant.py -s   # README numbers

GEMV bandwidth: a decode-shaped product (one row) over enough matrices to defeat the caches,
in GB/s of weights (+ scales/biases) read, beside the machine's copy bandwidth (numpy,
read + write). Models: random GPT-OSS presets quantized as ``make-test-model --quantize`` writes
them, decode forward passes and a prefill, ours vs the same model object on MLX's kernels.
Without ``MHC_BENCH_QUANT`` everything runs once, tiny, as a test (CI).
"""

import os
import statistics
import time

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from conftest import QUANT_ROWS
from mlx_harmony_core import _core, quant
from mlx_harmony_core.bench import copy_bandwidth_gbps, forward_tokens_per_s

FULL = bool(os.environ.get("MHC_BENCH_QUANT"))
ROUNDS = int(os.environ.get("MHC_BENCH_ROUNDS", "5")) if FULL else 1
FORMATS = [("affine", 4, 64), ("affine", 4, 32), ("affine", 8, 64), ("mxfp4", 4, 32)]


def _matrices(mode, bits, gs, n, k, count):
    mats = []
    for i in range(count):
        w = mx.random.normal((n, k), key=mx.random.key(i))
        mats.append(tuple(mx.quantize(w, group_size=gs, bits=bits, mode=mode)))
    mx.eval(mats)
    return mats


def _gemv_seconds(op, x, mats, mode, bits, gs):
    t0 = time.perf_counter()
    for q in mats:
        b = q[2] if len(q) > 2 else None
        mx.eval(op(x, q[0], q[1], b, transpose=True, group_size=gs, bits=bits, mode=mode))
    return time.perf_counter() - t0


@pytest.mark.parametrize("mode,bits,gs", FORMATS)
def test_gemv_bandwidth(mode, bits, gs):
    # 12 matrices of 4096 x 4096: 100-250 MB, far past the last-level cache.
    n, k, count = (4096, 4096, 12) if FULL else (256, 512, 2)
    mats = _matrices(mode, bits, gs, n, k, count)
    nbytes = sum(a.nbytes for q in mats for a in q)
    x = mx.random.normal((1, k))
    mx.eval(x)
    ours, theirs = [], []
    for _ in range(ROUNDS):  # alternating rounds: the VM's noise hits both alike
        ours.append(nbytes / _gemv_seconds(_core.quantized_matmul, x, mats, mode, bits, gs))
        # MLX's kernel over 2 of the matrices (it is ~20x slower): bytes of 2 / its time
        t = _gemv_seconds(mx.quantized_matmul, x, mats[:2], mode, bits, gs)
        theirs.append(nbytes * 2 / count / t)
    name = f"{mode} {bits}-bit g{gs}" if mode == "affine" else "mxfp4"
    QUANT_ROWS.append(
        (
            f"GEMV {name}, 1 row",
            statistics.median(ours) / 1e9,
            statistics.median(theirs) / 1e9,
            "GB/s",
        )
    )
    if mode == "affine" and bits == 4 and gs == 64:
        QUANT_ROWS.append(
            (
                "machine copy bandwidth (numpy, read + write)",
                copy_bandwidth_gbps(256 if FULL else 16),
                0.0,
                "GB/s",
            )
        )
        QUANT_ROWS.append((f"ISA {_core.quant_isa()}, {_core.quant_threads()} threads", 0, 0, ""))


def _prefill_tps(model, tokens):
    from mlx_harmony_core.kv_cache import make_cache

    prompt = mx.array([list(range(1000, 1000 + tokens))])
    t0 = time.perf_counter()
    mx.eval(model(prompt, cache=make_cache(model)))
    return tokens / (time.perf_counter() - t0)


@pytest.mark.parametrize("quantize", ["4", "8", "mxfp4", "mxfp4-q8"])
@pytest.mark.parametrize("preset", ["small", "mid"] if FULL else ["demo"])
def test_quantized_gpt_oss(tmp_path_factory, preset, quantize):
    path = tmp_path_factory.mktemp("qbench") / f"{preset}-{quantize}"
    mhc.make_test_model(path, preset=preset, quantize=quantize)
    engine = mhc.load(path)
    assert quant.switched_layers(engine.model)
    prompt = list(range(1000, 1064))
    prefill = 512 if FULL else 16
    rows = {"decode": ([], []), "prefill": ([], [])}
    for _ in range(ROUNDS):
        rows["decode"][0].append(forward_tokens_per_s(engine.model, prompt, 16 if FULL else 2))
        rows["prefill"][0].append(_prefill_tps(engine.model, prefill))
        with quant.kernels(False):
            rows["decode"][1].append(forward_tokens_per_s(engine.model, prompt, 4 if FULL else 1))
            rows["prefill"][1].append(_prefill_tps(engine.model, prefill))
    for what, (ours, theirs) in rows.items():
        n = f"{prefill} tokens" if what == "prefill" else "forward pass"
        QUANT_ROWS.append(
            (
                f"{preset} GPT-OSS {quantize}: {what} ({n})",
                statistics.median(ours),
                statistics.median(theirs),
                "tok/s",
            )
        )
