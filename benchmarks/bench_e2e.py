"""End-to-end decode and prefill, ours vs mlx-lm's stream_generate, on random GPT-OSS models.

    python -m pytest benchmarks/bench_e2e.py               # demo (tiny, overhead-bound)
    MHC_BENCH_MID=1 python -m pytest benchmarks/bench_e2e.py   # + mid (0.84B, bandwidth-bound)

Greedy and the usual chain (temperature 0.8, top-k 40, top-p 0.9, min-p 0.05, repetition
penalty 1.1); same weights, same prompt tokens, exactly the same number of generated tokens.
The benchmark's time is one whole generation; the report per model is printed at the end.
"""

import os

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.bench import run_mlx_lm, run_ours, synthetic_prompt

CHAIN = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=0)


@pytest.fixture(scope="module", params=["demo", "mid"])
def model(request, tmp_path_factory):
    if request.param == "mid":
        if request.config.getoption("benchmark_disable", False) or not os.environ.get(
            "MHC_BENCH_MID"
        ):
            pytest.skip("set MHC_BENCH_MID=1 for the 0.84B model (minutes, ~7 GB of RAM)")
        path = mhc.make_test_model(tmp_path_factory.mktemp("m") / "mid", preset="mid")
        return "mid", mhc.load(path), 128, 32
    return "demo", mhc.load("demo"), 512, 128


@pytest.mark.parametrize("sampling", ["greedy", "chain"])
@pytest.mark.parametrize("engine", ["ours", "mlx_lm"])
def test_generate(benchmark, model, sampling, engine):
    name, eng, prompt_tokens, gen = model
    if benchmark.disabled:
        prompt_tokens, gen = 16, 4
    params = (
        mhc.SamplingParams(**CHAIN) if sampling == "chain" else mhc.SamplingParams(temperature=0.0)
    )
    prompt = synthetic_prompt(prompt_tokens, eng.vocab_size, avoid=eng.chat_format.stop_ids())
    benchmark.group = f"{name}: {prompt_tokens} prompt + {gen} generated, {sampling}"
    benchmark.extra_info["engine"] = engine
    fn = run_ours if engine == "ours" else run_mlx_lm
    target = eng
    fn(target, prompt[:16], 4, params)  # warm-up
    run = benchmark.pedantic(
        fn, args=(target, prompt, gen, params), rounds=1 if benchmark.disabled else 3, iterations=1
    )
    assert run.tokens == gen
    benchmark.extra_info.update(
        prefill_tps=run.prefill_tps, decode_tps=run.decode_tps, ttft_s=run.ttft_s
    )
