"""The _core extension: mx.array in and out, greedy and temperature draws against numpy."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import _core
from support.stats import assert_distribution


def softmax64(x: np.ndarray, t: float) -> np.ndarray:
    z = x.astype(np.float64) / t
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


def test_extension_takes_and_returns_mx_arrays():
    (out,) = _core.sample(mx.array([0.0, 3.0, 1.0]), temperature=0.0)
    assert isinstance(out, mx.array)
    assert out.dtype == mx.int32 and out.shape == ()
    assert out.item() == 1


def test_core_importable_before_mlx_core_in_fresh_process():
    # _core imports mlx.core itself, so even a direct import of the extension works.
    code = "import mlx_harmony_core._core as c; import mlx.core as mx; print(c.sample(mx.array([1.0, 2.0]), temperature=0)[0].item())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 201088])
def test_greedy_equals_argmax(rng, dtype, vocab):
    x = mx.array(rng.normal(size=(4, vocab)).astype(np.float32)).astype(dtype)
    ids = _core.sample(x, temperature=0.0)[0]
    assert ids.shape == (4,)
    assert np.array_equal(np.array(ids), np.array(mx.argmax(x, axis=-1)).astype(np.int32))


def test_greedy_ties_take_the_first_index():
    x = mx.array([[1.0, 5.0, 5.0, 2.0], [-np.inf, 0.0, 0.0, -np.inf]])
    assert _core.sample(x, temperature=0.0)[0].tolist() == [1, 1]


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 2.5])
def test_temperature_matches_float64_softmax(rng, temperature):
    logits = rng.normal(scale=2.0, size=12).astype(np.float32)
    logits[3] = -np.inf
    rows = 40000
    x = mx.broadcast_to(mx.array(logits), (rows, logits.size))
    ids = np.array(_core.sample(x, temperature=temperature, seed=7, counter=0)[0])
    assert_distribution(ids, softmax64(logits, temperature))


def test_a_wrong_temperature_is_detected(rng):
    # The test's power: draws at T=1 must fail the check against T=0.7.
    logits = rng.normal(scale=2.0, size=12).astype(np.float32)
    x = mx.broadcast_to(mx.array(logits), (40000, logits.size))
    ids = np.array(_core.sample(x, temperature=1.0, seed=7)[0])
    with pytest.raises(AssertionError):
        assert_distribution(ids, softmax64(logits, 0.7))


def test_seeded_draws_reproduce_and_counters_differ(rng):
    x = mx.array(rng.normal(size=(8, 1000)).astype(np.float32))
    a = _core.sample(x, temperature=1.0, seed=5, counter=3)[0]
    b = _core.sample(x, temperature=1.0, seed=5, counter=3)[0]
    c = _core.sample(x, temperature=1.0, seed=5, counter=4)[0]
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_sampler_object_is_reproducible_across_instances(rng):
    x = mx.array(rng.normal(size=(2000,)).astype(np.float32))
    p = mhc.SamplingParams(temperature=0.9, seed=11)
    s1, s2 = mhc.Sampler(p), mhc.Sampler(p)
    assert [s1(x).item() for _ in range(20)] == [s2(x).item() for _ in range(20)]


def test_uniform01_is_uniform():
    u = np.array([_core.uniform01(1, c, 0) for c in range(20000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    assert_distribution(np.repeat(np.arange(20), counts), np.full(20, 0.05))


@pytest.mark.parametrize(
    "logits, message",
    [
        (mx.zeros((2, 3, 4)), "shape"),
        (mx.zeros((3,), dtype=mx.int32), "float32"),
        (mx.zeros((2, 0)), "empty"),
    ],
)
def test_bad_logits_raise_value_error(logits, message):
    with pytest.raises(ValueError, match=message):
        _core.sample(logits)[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_raise(bad):
    x = mx.array([[0.0, 1.0], [bad, 0.0]])
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        mhc.Sampler(mhc.SamplingParams(temperature=0.0))(x)


def test_all_negative_inf_raises():
    with pytest.raises(ValueError, match="-inf everywhere"):
        mhc.Sampler()(mx.full((5,), -np.inf))


def test_bad_temperature_rejected():
    with pytest.raises(ValueError, match="temperature"):
        _core.sample(mx.zeros((3,)), temperature=-1.0)
    with pytest.raises(ValueError):
        mhc.SamplingParams(temperature=-0.1)
    with pytest.raises(ValueError):
        mhc.SamplingParams(temprature=1.0)


def test_sampler_rejects_non_arrays():
    with pytest.raises(TypeError, match="mx.array"):
        mhc.Sampler()([0.0, 1.0])
