"""How member probabilities become one calibrated answer: a weighted average, then temperature scaling.

``combine`` averages member softmaxes with the ensemble weights; ``apply_temperature`` computes
``softmax(log(p) / T)`` (Guo et al. 2017); ``fit_temperature`` finds the ``T`` that calibrates probabilities
on validation labels. Results fit temperatures, inference applies them: both import them from here.

    .venv/bin/python -m pytest -q tests/test_ensemble.py
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from automl_tl.evaluate.metrics import PROB_EPS

__all__ = ["T_MAX", "T_MIN", "apply_temperature", "combine", "fit_temperature"]

# Bounds of the fitted temperature: beyond them the validation set is telling us nothing trustworthy.
T_MIN, T_MAX = 0.05, 20.0


def combine(probs_list: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted average of member probabilities (weights need not sum to one)."""
    if len(probs_list) != len(weights) or not probs_list:
        raise ValueError(f"need one weight per member, got {len(probs_list)} members and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs_list])
    out: np.ndarray = np.tensordot(w / w.sum(), stacked, axes=1)
    return out


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row: T > 1 softens, T < 1 sharpens, T = 1 keeps p (clipped)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_EPS, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    out: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return out


def _nll(log_p: np.ndarray, labels: np.ndarray, inv_t: float) -> float:
    z = log_p * inv_t
    z_max = z.max(axis=1, keepdims=True)
    lse = z_max[:, 0] + np.log(np.exp(z - z_max).sum(axis=1))
    return float(np.mean(lse - z[np.arange(labels.size), labels]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, iterations: int = 100) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of ``softmax(log(p) / T)`` on ``labels``.

    The NLL is convex in 1/T, hence unimodal in log T, so a golden-section search over log T finds the
    global minimum without gradients. If the best T is not better than T = 1, returns 1.0 exactly.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or labels.size == 0:
        raise ValueError(f"need probs (N, C) and labels (N,) with N >= 1, got {probs.shape} and {labels.shape}")
    log_p = np.log(np.clip(probs, PROB_EPS, None))

    def nll(log_t: float) -> float:
        return _nll(log_p, labels, math.exp(-log_t))

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    candidates = [(nll(lo), lo), (fa, a), (fb, b), (nll(hi), hi)]
    best_nll, best_log_t = min(candidates)
    if not best_nll < nll(0.0) - 1e-9:  # no real gain (flat NLL, e.g. uniform probabilities): keep T = 1
        return 1.0
    return float(min(max(math.exp(best_log_t), T_MIN), T_MAX))
