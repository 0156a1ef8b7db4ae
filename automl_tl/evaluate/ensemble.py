"""Ensembles of finished trials, chosen on their saved validation probabilities, and temperature scaling.

Two selection methods, both working only on each trial's ``val_probs.npy`` (no model is run here):

* ``top_k``: the ``k`` best single trials, averaged with equal weights;
* ``greedy``: Caruana et al. (2004), "Ensemble selection from libraries of models": start from the best
  ``init_best`` trials, then repeatedly add (with replacement) the trial that most improves the running
  average; a trial picked twice counts twice, so weights are pick counts over the total.

Temperature scaling (Guo et al. 2017) then fits one scalar ``T`` on validation data so that
``softmax(log(p) / T)`` is calibrated. The test split never enters any of this.

    .venv/bin/python -m pytest -q tests/test_ensemble.py
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from automl_tl.errors import ConfigError, SearchError
from automl_tl.evaluate.metrics import PROB_EPS, classification_metrics, log_loss

__all__ = [
    "ENSEMBLE_METRICS",
    "EnsembleSelection",
    "T_MIN",
    "T_MAX",
    "apply_temperature",
    "combine",
    "fit_temperature",
    "no_worse_than_best",
    "select_ensemble",
    "select_greedy",
    "select_top_k",
]

# Bounds of the fitted temperature: beyond them the validation set is telling us nothing trustworthy.
T_MIN, T_MAX = 0.05, 20.0

EnsembleMethod = Literal["top_k", "greedy"]


@dataclasses.dataclass(frozen=True)
class EnsembleSelection:
    """The chosen members (trial ids, first pick first), their weights (summing to 1) and the val score."""

    members: tuple[str, ...]
    weights: tuple[float, ...]
    method: str
    metric: str
    val_score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": list(self.members),
            "weights": list(self.weights),
            "method": self.method,
            "metric": self.metric,
            "val_score": self.val_score,
        }


# --- scores ---------------------------------------------------------------------------------------------

ENSEMBLE_METRICS: tuple[str, ...] = ("log_loss", "accuracy", "balanced_accuracy", "macro_f1")


def _metric_name(metric: str) -> str:
    """A known metric name; the config's ``val_accuracy``-style names are accepted too."""
    name = metric.removeprefix("val_")
    if name not in ENSEMBLE_METRICS:
        raise ConfigError(f"ensemble metric must be one of {', '.join(ENSEMBLE_METRICS)}, got {metric!r}")
    return name


def _score_fn(metric: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """``metric`` as a function where larger is better (log loss is negated)."""
    if metric == "log_loss":
        return lambda labels, probs: -log_loss(labels, probs)
    if metric == "accuracy":
        return lambda labels, probs: float(np.mean(probs.argmax(axis=1) == labels))
    if metric in ("balanced_accuracy", "macro_f1"):
        def score(labels: np.ndarray, probs: np.ndarray) -> float:
            names = [str(i) for i in range(probs.shape[1])]  # names do not matter for the value
            m = classification_metrics(labels, probs, names, top_k=())
            return float(m["balanced_accuracy"] if metric == "balanced_accuracy" else m["f1"]["macro"])

        return score
    raise ConfigError(f"ensemble metric must be one of {', '.join(ENSEMBLE_METRICS)}, got {metric!r}")


def _report(metric: str, score: float) -> float:
    return -score if metric == "log_loss" else score


def _key(metric: str, labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Sort key (larger is better): the metric, then log loss to break the many ties of accuracy."""
    primary = _score_fn(metric)(labels, probs)
    secondary = primary if metric == "log_loss" else -log_loss(labels, probs)
    return primary, secondary


def _checked_pool(val_probs: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    if not val_probs:
        raise SearchError("no trial left validation probabilities: nothing to ensemble")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise SearchError(f"validation labels must be a 1-d integer array, got shape {labels.shape}, {labels.dtype}")
    ids = list(val_probs)
    shape = np.asarray(val_probs[ids[0]]).shape
    for trial_id in ids:
        probs = np.asarray(val_probs[trial_id])
        if probs.ndim != 2 or probs.shape[0] != labels.size or probs.shape != shape:
            raise SearchError(
                f"trial {trial_id}: val_probs has shape {probs.shape}, expected ({labels.size}, C) like "
                f"trial {ids[0]}'s {shape}"
            )
    return ids, labels.astype(np.int64)


# --- selection ------------------------------------------------------------------------------------------


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


def select_top_k(
    val_probs: Mapping[str, np.ndarray], labels: np.ndarray, k: int, metric: str = "accuracy"
) -> EnsembleSelection:
    """The ``k`` best trials by ``metric`` on validation (ties: lower log loss, then pool order), averaged."""
    ids, labels = _checked_pool(val_probs, labels)
    metric = _metric_name(metric)
    if k < 1:
        raise ConfigError(f"top-k ensemble size must be >= 1, got {k}")
    keys = {t: _key(metric, labels, np.asarray(val_probs[t], dtype=np.float64)) for t in ids}
    ranked = sorted(ids, key=lambda t: keys[t], reverse=True)  # sorted() is stable: pool order breaks ties
    members = tuple(ranked[:k])
    weights = tuple(1.0 / len(members) for _ in members)
    probs = combine([val_probs[t] for t in members], weights)
    return EnsembleSelection(members, weights, "top_k", metric, _report(metric, _score_fn(metric)(labels, probs)))


def select_greedy(
    val_probs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    size: int,
    metric: str = "log_loss",
    init_best: int = 1,
) -> EnsembleSelection:
    """Caruana's greedy ensemble selection with replacement.

    Seeds with the ``init_best`` best single trials, then adds trials one pick at a time (a trial may be
    picked again, which raises its weight) until ``size`` picks. Returns the prefix of the pick sequence
    that scored best on validation, the shortest one on ties, so extra picks can never make it worse.
    """
    ids, labels = _checked_pool(val_probs, labels)
    metric = _metric_name(metric)
    if size < 1:
        raise ConfigError(f"greedy ensemble size must be >= 1, got {size}")
    if not 0 <= init_best <= size:
        raise ConfigError(f"init_best must lie in [0, size={size}], got {init_best}")
    pool = {t: np.asarray(val_probs[t], dtype=np.float64) for t in ids}
    singles = {t: _key(metric, labels, pool[t]) for t in ids}
    ranked = sorted(ids, key=lambda t: singles[t], reverse=True)

    picks: list[str] = list(ranked[: min(init_best, len(ranked))])
    running = np.sum([pool[t] for t in picks], axis=0) if picks else np.zeros_like(pool[ids[0]])
    best_key = _key(metric, labels, running / len(picks)) if picks else (-math.inf, -math.inf)
    best_len = len(picks)
    while len(picks) < size:
        n = len(picks) + 1
        choice, choice_key = ids[0], (-math.inf, -math.inf)
        for t in ranked:  # the better single trial wins a tie between candidates
            key = _key(metric, labels, (running + pool[t]) / n)
            if key > choice_key:
                choice, choice_key = t, key
        picks.append(choice)
        running = running + pool[choice]
        if choice_key > best_key:
            best_key, best_len = choice_key, len(picks)

    chosen = picks[:best_len]
    members = tuple(dict.fromkeys(chosen))  # first-pick order, no duplicates
    weights = tuple(chosen.count(t) / len(chosen) for t in members)
    return EnsembleSelection(members, weights, "greedy", metric, _report(metric, best_key[0]))


def select_ensemble(
    val_probs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    method: EnsembleMethod,
    size: int,
    metric: str = "log_loss",
) -> EnsembleSelection:
    """The selection the config asks for (``search.ensemble_method`` and ``search.ensemble_size``)."""
    if method == "top_k":
        return select_top_k(val_probs, labels, size, metric)
    if method == "greedy":
        return select_greedy(val_probs, labels, size, metric)
    raise ConfigError(f"ensemble method must be 'top_k' or 'greedy', got {method!r}")


def no_worse_than_best(
    selection: EnsembleSelection, probs: Mapping[str, np.ndarray], labels: np.ndarray, best_id: str
) -> tuple[EnsembleSelection, str]:
    """``selection``, or the best member alone when the ensemble does not beat it on ``probs``; and why.

    Both are calibrated first (each its own temperature, fitted on the same predictions); the ensemble beats
    the member with a higher accuracy, or an equal one and a lower log loss.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if selection.members == (best_id,):
        return selection, f"the selection kept the best member {best_id} alone"
    ens = combine([probs[t] for t in selection.members], selection.weights)
    mine = apply_temperature(ens, fit_temperature(ens, labels))
    theirs = apply_temperature(probs[best_id], fit_temperature(probs[best_id], labels))
    acc = [float(np.mean(p.argmax(axis=1) == labels)) for p in (mine, theirs)]
    loss = [log_loss(labels, p) for p in (mine, theirs)]
    if acc[0] > acc[1] or (acc[0] == acc[1] and loss[0] < loss[1]):
        return selection, f"the ensemble beat its best member {best_id} (accuracy {acc[0]:.4f} vs {acc[1]:.4f})"
    why = (f"the ensemble of {len(selection.members)} did not beat its best member {best_id} (accuracy {acc[0]:.4f} "
           f"vs {acc[1]:.4f}, log loss {loss[0]:.4f} vs {loss[1]:.4f}): the best member is served alone")  # fmt: skip
    return EnsembleSelection((best_id,), (1.0,), "best_member", selection.metric, selection.val_score), why


# --- temperature scaling --------------------------------------------------------------------------------


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
