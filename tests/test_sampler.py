"""The fused sampler against the float64 reference, mlx-lm, and bad inputs."""

import os
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_harmony_core as mhc
from mlx_harmony_core.sampling import check_ids
from support.reference import process, reference_probs, top_p_is_ambiguous
from support.stats import assert_distribution

ROWS = 40000
KERNELS = [pytest.param(True, id="kernel"), pytest.param(False, id="mlx-ops")]


def draw(logits, params, *, rows=ROWS, kernel=None, history=None, dtype=mx.float32):
    x = mx.broadcast_to(mx.array(np.asarray(logits, np.float32)).astype(dtype), (rows, len(logits)))
    sampler = mhc.Sampler(params, kernel=kernel)
    return np.array(sampler(x, history))


def logits_for(seed, vocab=16, scale=2.0):
    return np.random.default_rng(seed).normal(scale=scale, size=vocab).astype(np.float32)


def safe_logits(seed, temperature, top_p, top_k=0, vocab=16):
    while top_p_is_ambiguous(logits_for(seed, vocab), temperature, top_p, top_k):
        seed += 1000
    return logits_for(seed, vocab)


def check(logits, kernel=None, history=None, **p):
    params = mhc.SamplingParams(seed=1, **p)
    expected = reference_probs(
        logits,
        bias=p.get("logit_bias"),
        history=history,
        window=params.repetition_context_size,
        **{k: v for k, v in p.items() if k not in ("logit_bias", "repetition_context_size")},
    )
    assert_distribution(draw(logits, params, kernel=kernel, history=history), expected)


# -- each control alone and combined, on both paths ---------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "controls",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.7, top_k=3),
        dict(temperature=1.0, top_k=1),
        dict(temperature=0.8, top_p=0.7),
        dict(temperature=1.3, top_p=0.95),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, min_p=0.3, min_tokens_to_keep=4),
        dict(temperature=1.0, top_p=0.2, min_tokens_to_keep=3),
        dict(temperature=1.0, xtc_probability=0.5, xtc_threshold=0.08),
        dict(temperature=1.0, xtc_probability=1.0, xtc_threshold=0.05),
        dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05),
        dict(
            temperature=0.8, top_k=10, top_p=0.9, min_p=0.02, xtc_probability=0.5, xtc_threshold=0.1
        ),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_distribution_matches_reference(kernel, controls):
    logits = safe_logits(
        3, controls["temperature"], controls.get("top_p", 1.0), controls.get("top_k", 0)
    )
    check(logits, kernel=kernel, **controls)


@pytest.mark.parametrize("kernel", KERNELS)
def test_penalties_and_bias_distribution(kernel):
    logits = logits_for(5)
    history = [1, 2, 2, 3, 7, 7, 7, 11, 0]
    check(
        logits,
        kernel=kernel,
        history=history,
        temperature=1.0,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={4: 1.5, 2: -0.7},
        repetition_context_size=6,
    )


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_inputs(dtype):
    logits = np.array(mx.array(logits_for(9)).astype(dtype).astype(mx.float32))
    params = mhc.SamplingParams(temperature=0.9, top_k=6, seed=2)
    assert_distribution(
        draw(logits, params, dtype=dtype), reference_probs(logits, temperature=0.9, top_k=6)
    )


# -- edge cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_ties_are_kept_at_the_boundary(kernel):
    logits = np.array([3.0, 2.0, 2.0, 2.0, 0.0, -1.0], np.float32)
    check(logits, kernel=kernel, temperature=1.0, top_k=2)  # all three 2.0s stay
    check(logits, kernel=kernel, temperature=1.0, top_p=0.5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_all_neg_inf_but_one(kernel):
    logits = np.full(10, -np.inf, np.float32)
    logits[6] = -3.0
    for controls in [dict(temperature=1.0), dict(temperature=1.0, top_p=0.5, min_p=0.5, top_k=3)]:
        ids = draw(logits, mhc.SamplingParams(seed=0, **controls), rows=500, kernel=kernel)
        assert (ids == 6).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_top_p_one_and_top_k_equal_vocab_are_off(kernel):
    logits = logits_for(11)
    check(logits, kernel=kernel, temperature=1.0, top_p=1.0, top_k=16)


@pytest.mark.parametrize("kernel", KERNELS)
def test_temperature_near_zero(kernel):
    logits = logits_for(13)  # its two largest logits differ by 0.001: a near tie
    check(logits, kernel=kernel, temperature=1e-3)
    logits[6] += 0.5
    ids = draw(logits, mhc.SamplingParams(temperature=1e-3, seed=0), rows=2000, kernel=kernel)
    assert (ids == 6).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_applies_bias_and_penalties(kernel):
    logits = np.array([0.0, 5.0, 4.9, 1.0], np.float32)
    s = mhc.Sampler(mhc.SamplingParams(temperature=0.0, repetition_penalty=1.5), kernel=kernel)
    assert s(mx.array(logits), [1]).item() == 2
    s = mhc.Sampler(mhc.SamplingParams(temperature=0.0, logit_bias={3: 10.0}), kernel=kernel)
    assert s(mx.array(logits)).item() == 3


def test_large_vocab_chain_agrees_between_paths():
    # At the real vocabulary size both paths draw from the same small kept set.
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(201088) * 3).astype(np.float32)
    p = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05)
    expected = reference_probs(logits, **p)
    for kernel in (True, False):
        ids = draw(logits, mhc.SamplingParams(seed=4, **p), rows=64, kernel=kernel)
        assert (expected[ids] > 0).all()
        assert set(np.unique(ids)) <= set(np.nonzero(expected)[0])


# -- against mlx-lm ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "controls", [dict(top_k=4), dict(top_p=0.8), dict(min_p=0.15)], ids=lambda c: next(iter(c))
)
def test_single_filter_equals_mlx_lm_make_sampler(controls):
    from mlx_lm.sample_utils import make_sampler

    logits = safe_logits(21, 1.0, controls.get("top_p", 1.0))
    expected = reference_probs(logits, temperature=1.0, **controls)
    x = mx.broadcast_to(mx.array(logits), (ROWS, logits.size))
    logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
    theirs = np.array(make_sampler(temp=1.0, **controls)(logprobs))
    assert_distribution(theirs, expected)  # mlx-lm draws from the reference distribution...
    ours = draw(logits, mhc.SamplingParams(temperature=1.0, seed=3, **controls))
    assert_distribution(ours, expected)  # ...and so do we


def test_xtc_equals_mlx_lm():
    from mlx_lm.sample_utils import make_sampler

    logits = np.array([2.0, 1.8, 1.5, 0.5, 0.0, -1.0, -2.0, -3.0], np.float32)
    expected = reference_probs(logits, temperature=1.0, xtc_probability=0.6, xtc_threshold=0.1)
    sampler = make_sampler(temp=1.0, xtc_probability=0.6, xtc_threshold=0.1)
    mx.random.seed(0)
    x = mx.array(logits)[None]
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    theirs = np.array([sampler(x).item() for _ in range(8000)])  # mlx-lm tosses one coin per call
    assert_distribution(theirs, expected)
    assert_distribution(
        draw(
            logits,
            mhc.SamplingParams(temperature=1.0, xtc_probability=0.6, xtc_threshold=0.1, seed=5),
        ),
        expected,
    )


def test_penalties_equal_mlx_lm_processors():
    from mlx_lm.sample_utils import make_logits_processors

    rng = np.random.default_rng(7)
    for trial in range(60):
        logits = rng.normal(scale=2.0, size=50).astype(np.float32)
        history = rng.integers(0, 50, size=rng.integers(1, 40)).tolist()
        kw = dict(
            repetition_penalty=float(rng.uniform(0.5, 2.0)),
            presence_penalty=float(rng.uniform(-1, 1)),
            frequency_penalty=float(rng.uniform(-1, 1)),
            logit_bias={int(rng.integers(50)): float(rng.normal())},
        )
        procs = make_logits_processors(
            logit_bias=kw["logit_bias"],
            repetition_penalty=kw["repetition_penalty"],
            repetition_context_size=16,
            presence_penalty=kw["presence_penalty"],
            presence_context_size=16,
            frequency_penalty=kw["frequency_penalty"],
            frequency_context_size=16,
        )
        theirs = mx.array(logits)[None]
        for proc in procs:
            theirs = proc(mx.array(history), theirs)
        ref = process(
            logits,
            bias=kw["logit_bias"],
            history=history,
            window=16,
            repetition_penalty=kw["repetition_penalty"],
            presence_penalty=kw["presence_penalty"],
            frequency_penalty=kw["frequency_penalty"],
        )
        np.testing.assert_allclose(np.array(theirs)[0], ref, rtol=1e-5, atol=1e-5)
        for kernel in (True, False):
            s = mhc.Sampler(
                mhc.SamplingParams(temperature=0.0, repetition_context_size=16, **kw), kernel=kernel
            )
            assert s(mx.array(logits), history).item() == int(np.argmax(np.array(theirs)[0])), trial


# -- reproducibility and independence ------------------------------------------------------------
def test_seeded_draws_reproduce_in_another_process():
    code = (
        "import mlx.core as mx, numpy as np, mlx_harmony_core as m\n"
        "x = mx.array(np.random.default_rng(0).normal(size=(4, 5000)).astype(np.float32))\n"
        "s = m.Sampler(m.SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=42))\n"
        "print([s(x).tolist() for _ in range(5)])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
        ).stdout
        for _ in range(2)
    }
    assert len(outs) == 1
    x = mx.array(np.random.default_rng(0).normal(size=(4, 5000)).astype(np.float32))
    s = mhc.Sampler(mhc.SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=42))
    assert str([s(x).tolist() for _ in range(5)]) == outs.pop().strip()


def test_seeded_draws_reproduce_across_threads():
    x = mx.array(np.random.default_rng(1).normal(size=(2, 3000)).astype(np.float32))
    p = mhc.SamplingParams(temperature=1.0, min_p=0.01, seed=9)
    expected = [mhc.Sampler(p)(x).tolist() for _ in range(1)] * 8
    results = [None] * 8

    def work(i):
        results[i] = mhc.Sampler(p)(x).tolist()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_batch_rows_are_independent():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 300)).astype(np.float32)
    b = a.copy()
    b[[0, 2, 5]] = rng.normal(size=(3, 300))
    p = mhc.SamplingParams(temperature=1.0, top_p=0.95, seed=77)
    ia, ib = mhc.Sampler(p)(mx.array(a)).tolist(), mhc.Sampler(p)(mx.array(b)).tolist()
    assert [ia[i] for i in (1, 3, 4)] == [ib[i] for i in (1, 3, 4)]


def test_per_row_history():
    logits = np.zeros((2, 4), np.float32)
    logits[:, 0] = 1.0
    s = mhc.Sampler(mhc.SamplingParams(temperature=0.0, presence_penalty=2.0))
    assert s(mx.array(logits), [[0], [1]]).tolist() == [1, 0]


# -- log-probabilities ---------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_logprobs_of_raw_distribution(kernel):
    rng = np.random.default_rng(8)
    x = rng.normal(scale=3, size=(3, 1000)).astype(np.float32)
    s = mhc.Sampler(
        mhc.SamplingParams(temperature=0.7, top_k=20, logit_bias={5: 3.0}, seed=1), kernel=kernel
    )
    ids, lp = s(mx.array(x), logprobs=5)
    ref = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    ids = np.array(ids)
    np.testing.assert_allclose(np.array(lp.logprob), ref[np.arange(3), ids], atol=1e-4)
    top = np.argsort(-x, axis=-1)[:, :5]
    assert np.array_equal(np.array(lp.top_ids), top)
    np.testing.assert_allclose(
        np.array(lp.top_logprobs), np.take_along_axis(ref, top, -1), atol=1e-4
    )


def test_logprobs_one_row_and_zero_alternatives():
    s = mhc.Sampler(mhc.SamplingParams(temperature=0.0))
    ids, lp = s(mx.array([0.0, 1.0, 2.0]), logprobs=0)
    assert ids.item() == 2 and lp.top_ids.shape == (0,)
    assert abs(lp.logprob.item() - (2.0 - np.log(np.exp([0.0, 1.0, 2.0]).sum()))) < 1e-5


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, logits, history, message",
    [
        (dict(top_k=20), mx.zeros((10,)), None, "larger than the vocabulary"),
        (dict(logit_bias={10: 1.0}), mx.zeros((10,)), None, "outside the vocabulary"),
        (dict(repetition_penalty=1.2), mx.zeros((10,)), [3, 10], r"outside \[0, 10\)"),
        (dict(repetition_penalty=1.2), mx.zeros((10,)), [-1], r"outside \[0, 10\)"),
        (dict(repetition_penalty=1.2), mx.zeros((2, 10)), [[1], [2], [3]], "3 rows"),
        (dict(), mx.zeros((2, 3, 10)), None, "shape"),
        (dict(), mx.zeros((0,)), None, "empty"),
        (dict(), mx.zeros((4,), dtype=mx.int32), None, "float32"),
    ],
)
def test_bad_input_raises_value_error(params, logits, history, message):
    with pytest.raises(ValueError, match=message):
        mhc.Sampler(mhc.SamplingParams(**params))(logits, history)


@pytest.mark.parametrize(
    "bad",
    [
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(top_k=-1),
        dict(min_tokens_to_keep=0),
        dict(xtc_threshold=0.7),
        dict(xtc_probability=2),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={1: float("nan")}),
        dict(temperature=float("inf")),
        dict(seed=-1),
        dict(unknown=1),
    ],
)
def test_params_validation(bad):
    with pytest.raises(ValueError):
        mhc.SamplingParams(**bad)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_rows_flagged(kernel, bad):
    x = np.zeros((3, 5), np.float32)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        mhc.Sampler(mhc.SamplingParams(top_p=0.5), kernel=kernel)(mx.array(x))


def test_check_ids_passes_good_ids():
    ids = mx.array([1, 2])
    assert check_ids(ids) is ids


# -- properties ----------------------------------------------------------------------------------
# Subnormal logits are excluded: logits / T underflows in float32 on any implementation.
finite = st.floats(-30, 30, allow_nan=False, allow_subnormal=False, width=32)


def _near_a_cut(x, temperature, min_p, xtc, tol=1e-4):
    finite = x[np.isfinite(x)].astype(np.float64)
    probs = np.exp((finite - finite.max()) / temperature)
    probs /= probs.sum()
    near_min_p = min_p > 0 and np.any(np.abs(probs / probs.max() - min_p) < tol)
    return near_min_p or (xtc > 0 and np.any(np.abs(probs - 0.2) < tol))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    logits=st.lists(st.one_of(finite, st.just(float("-inf"))), min_size=1, max_size=40).filter(
        lambda v: any(x != float("-inf") for x in v)
    ),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    top_k=st.integers(0, 6),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.5]),
    keep=st.integers(1, 3),
    xtc=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**32),
)
def test_draws_stay_in_the_reference_support(
    logits, temperature, top_k, top_p, min_p, keep, xtc, seed
):
    top_k = min(top_k, len(logits))
    x = np.array(logits, np.float32)
    if top_p < 1.0 and top_p_is_ambiguous(x, max(temperature, 1e-9), top_p, top_k, tol=1e-3):
        return
    if _near_a_cut(x, max(temperature, 1e-9), min_p, xtc):
        return  # float32 vs float64 may fall either side of a min-p or XTC threshold
    p = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        min_tokens_to_keep=keep,
        xtc_probability=xtc,
        xtc_threshold=0.2,
    )
    expected = reference_probs(x, **p)
    for kernel in (True, False):
        ids = np.array(
            mhc.Sampler(mhc.SamplingParams(seed=seed, **p), kernel=kernel)(
                mx.broadcast_to(mx.array(x), (16, x.size))
            )
        )
        assert (expected[ids] > 0).all(), (kernel, ids, expected)
