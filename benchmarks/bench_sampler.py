"""Sampler cost per call at GPT-OSS's vocabulary, ours vs mlx-lm's, in the same run.

Run: python -m pytest benchmarks/bench_sampler.py --benchmark-group-by=param:case
Each case has an ``ours`` and an ``mlx_lm`` row; the ratio is their medians.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

import mlx_harmony_core as mhc

VOCAB = 201088
CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
}


@pytest.fixture(scope="module", params=[1, 8], ids=lambda b: f"B{b}")
def logits(request):
    rng = np.random.default_rng(0)
    x = mx.array((rng.standard_normal((request.param, VOCAB)) * 3).astype(np.float32))
    mx.eval(x)
    return x


@pytest.mark.parametrize("case", list(CASES))
def test_ours(benchmark, logits, case):
    sampler = mhc.Sampler(mhc.SamplingParams(seed=0, **CASES[case]))
    benchmark.extra_info["engine"] = "ours"
    benchmark(lambda: mx.eval(sampler.lazy(logits)))


@pytest.mark.parametrize("case", list(CASES))
def test_mlx_lm(benchmark, logits, case):
    p = CASES[case]
    sampler = make_sampler(temp=p["temperature"])
    benchmark.extra_info["engine"] = "mlx_lm"
    # mlx-lm samples from log-probabilities, which generate_step computes first.
    benchmark(lambda: mx.eval(sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))))
