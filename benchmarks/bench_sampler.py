"""Sampler cost per call at GPT-OSS's vocabulary (201088), ours vs mlx-lm, in the same run.

    python -m pytest benchmarks/bench_sampler.py

mlx-lm's side is what its ``generate_step`` does per token: the logits processors, the
log-softmax normalization, then ``make_sampler``'s sampler. Logits are N(0, 3^2), a flat,
pessimistic case for nucleus filtering (a trained model's logits are far more peaked).
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler

import mlx_harmony_core as mhc

VOCAB = 201088
HISTORY = list(range(1000, 1064))
CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_k40": dict(temperature=1.0, top_k=40),
    "top_p0.9": dict(temperature=1.0, top_p=0.9),
    "min_p0.05": dict(temperature=1.0, min_p=0.05),
    "chain": dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
}


@pytest.fixture(
    scope="module",
    params=[(1, "float32"), (8, "float32"), (1, "bfloat16"), (8, "bfloat16")],
    ids=lambda p: f"B{p[0]}-{p[1]}",
)
def logits(request):
    batch, dtype = request.param
    rng = np.random.default_rng(0)
    x = mx.array((rng.standard_normal((batch, VOCAB)) * 3).astype(np.float32)).astype(
        getattr(mx, dtype)
    )
    mx.eval(x)
    return request.param, x


def _mlx_lm_step(p):
    sampler = make_sampler(
        temp=p["temperature"],
        top_k=p.get("top_k", 0),
        top_p=p.get("top_p", 0.0),
        min_p=p.get("min_p", 0.0),
    )
    procs = make_logits_processors(
        repetition_penalty=p.get("repetition_penalty"), repetition_context_size=64
    )
    tokens = mx.array(HISTORY)

    def step(x):
        for proc in procs:
            x = proc(tokens, x)
        return sampler(x - mx.logsumexp(x, axis=-1, keepdims=True))

    return step


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("engine", ["ours", "mlx_lm"])
def test_sampler(benchmark, logits, case, engine):
    (batch, dtype), x = logits
    p = CASES[case]
    benchmark.group = f"sampler {case} B={batch} {dtype}"
    benchmark.extra_info["engine"] = engine
    if engine == "ours":
        sampler = mhc.Sampler(mhc.SamplingParams(seed=0, **p))
        window = sampler.window(HISTORY, rows=batch)
        out = benchmark(lambda: mx.eval(sampler.lazy(x, window)))
    else:
        step = _mlx_lm_step(p)
        out = benchmark(lambda: mx.eval(step(x)))
    del out
