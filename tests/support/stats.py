"""Goodness-of-fit helpers for sampler tests (numpy only)."""

from __future__ import annotations

import math

import numpy as np


def chi2_critical(df: int, z: float = 5.0) -> float:
    """Upper critical value of chi-square with ``df`` degrees of freedom (Wilson-Hilferty).

    z = 5 is a ~3e-7 false-alarm rate: a correct sampler passes reliably, while a wrong
    distribution at the sample sizes used here exceeds it by orders of magnitude.
    """
    k = 2.0 / (9.0 * df)
    return df * (1.0 - k + z * math.sqrt(k)) ** 3


def chi2_stat(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (others pooled)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + [counts[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    if exp[-1] < 5:  # pooled cell too small: fold it into the smallest big cell
        obs, exp = obs[:-1], exp[:-1]
        # mass outside the big cells must then be (nearly) absent in the sample too
        assert counts[~big].sum() <= max(5, 10 * expected[~big].sum() + 5)
    obs_a, exp_a = np.array(obs, float), np.array(exp, float)
    stat = float(((obs_a - exp_a) ** 2 / exp_a).sum())
    return stat, max(len(obs) - 1, 1)


def assert_distribution(samples: np.ndarray, probs: np.ndarray, *, z: float = 5.0) -> None:
    """Fail if ``samples`` (token ids) do not follow ``probs`` (including zero-mass ids)."""
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    zero = probs == 0
    assert counts[zero].sum() == 0, (
        f"sampled ids with zero probability: {np.nonzero(counts * zero)[0][:10]}"
    )
    stat, df = chi2_stat(counts, probs)
    assert stat < chi2_critical(df, z), f"chi2 {stat:.1f} > {chi2_critical(df, z):.1f} (df={df})"
