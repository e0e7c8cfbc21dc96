"""A slow, obvious float64 reference of the documented sampling semantics (numpy only)."""

from __future__ import annotations

import math

import numpy as np


def process(
    logits,
    *,
    bias=None,
    history=None,
    window=64,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
) -> np.ndarray:
    """Logit bias, then repetition / presence / frequency penalties over the last `window` ids."""
    x = np.array(logits, dtype=np.float64)
    for token, b in (bias or {}).items():
        x[token] += b
    if history is not None and len(history):
        ids, counts = np.unique(np.asarray(history)[-window:], return_counts=True)
        for token, count in zip(ids, counts, strict=False):
            v = x[token]
            if repetition_penalty != 1.0:
                v = v * repetition_penalty if v < 0 else v / repetition_penalty
            x[token] = v - presence_penalty - frequency_penalty * count
    return x


def _order(z: np.ndarray) -> np.ndarray:
    """Ids sorted by value descending, then id ascending."""
    return np.lexsort((np.arange(z.size), -z))


def _keep_top(z: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """The top k of the kept set, ties with the k-th kept."""
    vals = np.sort(z[keep])[::-1]
    if vals.size <= k:
        return keep.copy()
    return keep & (z >= vals[k - 1])


def _softmax(z: np.ndarray, keep: np.ndarray) -> np.ndarray:
    p = np.zeros_like(z)
    m = z[keep].max()
    p[keep] = np.exp(z[keep] - m)
    return p / p.sum()


def filtered_keep(
    x: np.ndarray,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    min_tokens_to_keep=1,
    xtc=False,
    xtc_threshold=0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """(z, keep) after top-k, top-p, min-p and (if `xtc`) the XTC removal."""
    z = x / temperature
    keep = z > -np.inf
    keep_min = max(1, min_tokens_to_keep)
    if top_k > 0 and max(top_k, keep_min) < z.size:
        keep = _keep_top(z, keep, max(top_k, keep_min))
    if top_p < 1.0:
        p = _softmax(z, keep)
        order = [i for i in _order(z) if keep[i]]
        acc, count = 0.0, 0
        for i in order:
            acc += p[i]
            count += 1
            if acc >= top_p:
                break
        boundary = z[order[count - 1]]
        new = np.zeros_like(keep)
        new[order[:count]] = True
        new |= keep & (z == boundary)
        if new.sum() < keep_min:
            new = _keep_top(z, keep, keep_min)
        keep = new
    if min_p > 0.0:
        zmax = z[keep].max()
        passing = keep & (z >= zmax + math.log(min_p))
        keep = passing if passing.sum() >= keep_min else _keep_top(z, keep, keep_min)
    if xtc:
        p = _softmax(z, keep)
        above = keep & (p > xtc_threshold)
        if above.sum() >= 2:
            least = p[above].min()
            keep = keep & ~(above & (p > least))
    return z, keep


def reference_probs(
    logits,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    min_tokens_to_keep=1,
    xtc_probability=0.0,
    xtc_threshold=0.1,
    **processors,
) -> np.ndarray:
    """The exact distribution the sampler must draw from (float64)."""
    x = process(logits, **processors)
    if temperature == 0.0:
        p = np.zeros_like(x)
        p[int(np.argmax(x))] = 1.0
        return p
    opts = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        min_tokens_to_keep=min_tokens_to_keep,
        xtc_threshold=xtc_threshold,
    )
    z, keep = filtered_keep(x, **opts)
    probs = _softmax(z, keep)
    if xtc_probability > 0.0:
        z2, keep2 = filtered_keep(x, xtc=True, **opts)
        probs = (1 - xtc_probability) * probs + xtc_probability * _softmax(z2, keep2)
    return probs


def top_p_is_ambiguous(logits, temperature, top_p, top_k=0, tol=1e-4) -> bool:
    """True when a cumulative sum lands within `tol` of top_p (float32 vs float64 could differ)."""
    if top_p >= 1.0:
        return False
    z, keep = filtered_keep(np.asarray(logits, np.float64), temperature=temperature, top_k=top_k)
    p = _softmax(z, keep)
    cum = np.cumsum(np.sort(p[keep])[::-1])
    return bool(np.any(np.abs(cum - top_p) < tol))
