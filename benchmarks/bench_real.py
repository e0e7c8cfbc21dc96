"""A real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the package registry), ours vs mlx-lm
on the same weights (the same model object) vs llama.cpp on the same file.

    MHC_BENCH_REAL=1 python -m pytest benchmarks/bench_real.py -s   # 487 + 64 tokens, 5 runs

Without ``MHC_BENCH_REAL`` it runs once, tiny, as a test (CI). llama.cpp comes from
``llama-cpp-python`` (an optional dependency: ``pip install llama-cpp-python``, a ~15 min
build from source here); without it its rows are left out, with a message.
"""

import os
import statistics

import pytest

import mlx_harmony_core as mhc
from conftest import REAL_ROWS
from mlx_harmony_core.bench import compare, llama_cpp_runner

FULL = bool(os.environ.get("MHC_BENCH_REAL"))
PROMPT, GEN, RUNS = (487, 64, int(os.environ.get("MHC_BENCH_ROUNDS", "3"))) if FULL else (24, 4, 1)


@pytest.fixture(scope="module")
def llama_cpp(smollm2_path):
    runner = llama_cpp_runner(str(smollm2_path))
    if runner is None:
        REAL_ROWS.append(("llama.cpp", "-", "not installed (pip install llama-cpp-python)", ""))
    return runner


@pytest.mark.parametrize("weights", ["q4_1", "float32"])
def test_smollm2_ours_vs_mlx_lm_vs_llama_cpp(smollm2_path, llama_cpp, weights):
    engine = mhc.load(smollm2_path, dequantize=weights == "float32")
    report = compare(
        engine,
        prompt_tokens=PROMPT,
        gen_tokens=GEN,
        runs=RUNS,
        llama_cpp=llama_cpp if weights == "q4_1" else None,
    )
    for name, runs in report.runs.items():
        label = f"{name} ({'Q4_1 file' if name == 'llama.cpp' else weights})"
        prefill = statistics.median(r.prefill_tps for r in runs)
        decode = statistics.median(r.decode_tps for r in runs)
        spread = f"{min(r.decode_tps for r in runs):.1f}-{max(r.decode_tps for r in runs):.1f}"
        REAL_ROWS.append((label, f"{prefill:8.1f}", f"{decode:8.1f}", spread))
