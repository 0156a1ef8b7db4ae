"""Ensembles of finished trials, chosen on their saved validation probabilities, and temperature scaling.

Two selection methods, both working only on each trial's ``val_probs.npy`` (no model is run here):

* ``top_k``: the ``k`` best single trials, averaged with equal weights;
* ``greedy``: Caruana et al. (2004), "Ensemble selection from libraries of models": start from the best
  ``init_best`` trials, then repeatedly add (with replacement) the trial that most improves the running
  average; a trial picked twice counts twice, so weights are pick counts over the total.

With a latency budget (``search.latency_budget_ms``, and each trial's measured batch-1 forward in
``latency_ms``), both skip any trial whose addition would take the members' summed latency past the budget.

:func:`choose_cascade` then picks the cascade's cheap member and its confidence threshold
(:func:`cascade_threshold`): the pair that answers fastest on average while losing at most a tolerance of
the ensemble's right answers on validation.

Members are averaged with :func:`~automl_tl.inference.calibrate.combine`, the arithmetic inference uses.
The test split never enters any of this.

    .venv/bin/python -m pytest -q tests/test_ensemble.py
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np

from automl_tl.errors import ConfigError, SearchError
from automl_tl.evaluate.metrics import classification_metrics, log_loss
from automl_tl.evaluate.ranking import beats, metric_mode, metric_value, rank_key
from automl_tl.inference.calibrate import apply_temperature, combine, fit_temperature

__all__ = [
    "ENSEMBLE_METRICS",
    "CascadeChoice",
    "EnsembleSelection",
    "cascade_threshold",
    "choose_cascade",
    "within_budget",
    "no_worse_than_best",
    "select_ensemble",
    "select_greedy",
    "select_top_k",
]

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


def _metric_fn(metric: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """``metric`` of probabilities against labels (its own direction: log loss falls as the others rise)."""
    if metric == "log_loss":
        return log_loss
    if metric == "accuracy":
        return lambda labels, probs: float(np.mean(probs.argmax(axis=1) == labels))
    if metric in ("balanced_accuracy", "macro_f1"):
        def score(labels: np.ndarray, probs: np.ndarray) -> float:
            names = [str(i) for i in range(probs.shape[1])]  # names do not matter for the value
            m = classification_metrics(labels, probs, names, top_k=())
            return float(m["balanced_accuracy"] if metric == "balanced_accuracy" else m["f1"]["macro"])

        return score
    raise ConfigError(f"ensemble metric must be one of {', '.join(ENSEMBLE_METRICS)}, got {metric!r}")


def _key(metric: str, labels: np.ndarray, probs: np.ndarray) -> tuple[bool, float, float]:
    """Sort key, smaller is better: the ranking rule (:func:`rank_key`) on ``metric``, then log loss."""
    loss = log_loss(labels, probs)
    value = loss if metric == "log_loss" else _metric_fn(metric)(labels, probs)
    return rank_key(value, loss, metric_mode(metric))


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


def within_budget(members: Iterable[str], candidate: str, latency_ms: Mapping[str, float] | None,
                  budget_ms: float | None) -> bool:
    """Whether adding ``candidate`` to ``members`` keeps their summed latency within ``budget_ms`` (a member
    picked again adds nothing; no budget or no figures: always)."""
    if budget_ms is None or latency_ms is None:
        return True
    chosen = {*members, candidate}
    return sum(latency_ms[t] for t in chosen) <= budget_ms


def _reachable(ids: Iterable[str], latency_ms: Mapping[str, float] | None, budget_ms: float | None) -> float | None:
    """The budget, raised to the cheapest trial's latency when no trial fits it (that one is served anyway, as
    the fastest there is)."""
    if budget_ms is None or latency_ms is None:
        return budget_ms
    return max(budget_ms, min(latency_ms[t] for t in ids))


def select_top_k(
    val_probs: Mapping[str, np.ndarray], labels: np.ndarray, k: int, metric: str = "accuracy",
    latency_ms: Mapping[str, float] | None = None, budget_ms: float | None = None,
) -> EnsembleSelection:  # fmt: skip
    """The ``k`` best trials by ``metric`` on validation (ties: lower log loss, then pool order), averaged;
    a trial that would take the summed latency past ``budget_ms`` is skipped."""
    ids, labels = _checked_pool(val_probs, labels)
    metric = _metric_name(metric)
    if k < 1:
        raise ConfigError(f"top-k ensemble size must be >= 1, got {k}")
    keys = {t: _key(metric, labels, np.asarray(val_probs[t], dtype=np.float64)) for t in ids}
    ranked = sorted(ids, key=lambda t: keys[t])  # sorted() is stable: pool order breaks ties
    budget_ms = _reachable(ids, latency_ms, budget_ms)
    chosen: list[str] = []
    for t in ranked:
        if len(chosen) < k and within_budget(chosen, t, latency_ms, budget_ms):
            chosen.append(t)
    members = tuple(chosen)
    weights = tuple(1.0 / len(members) for _ in members)
    probs = combine([val_probs[t] for t in members], weights)
    return EnsembleSelection(members, weights, "top_k", metric, _metric_fn(metric)(labels, probs))


def select_greedy(
    val_probs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    size: int,
    metric: str = "log_loss",
    init_best: int = 1,
    latency_ms: Mapping[str, float] | None = None,
    budget_ms: float | None = None,
) -> EnsembleSelection:
    """Caruana's greedy ensemble selection with replacement.

    Seeds with the ``init_best`` best single trials, then adds trials one pick at a time (a trial may be
    picked again, which raises its weight) until ``size`` picks. Returns the prefix of the pick sequence
    that scored best on validation, the shortest one on ties, so extra picks can never make it worse.
    A trial that would take the summed latency of the distinct picks past ``budget_ms`` is never picked.
    """
    ids, labels = _checked_pool(val_probs, labels)
    metric = _metric_name(metric)
    if size < 1:
        raise ConfigError(f"greedy ensemble size must be >= 1, got {size}")
    if not 0 <= init_best <= size:
        raise ConfigError(f"init_best must lie in [0, size={size}], got {init_best}")
    pool = {t: np.asarray(val_probs[t], dtype=np.float64) for t in ids}
    singles = {t: _key(metric, labels, pool[t]) for t in ids}
    budget_ms = _reachable(ids, latency_ms, budget_ms)
    ranked = [t for t in sorted(ids, key=lambda t: singles[t]) if within_budget((), t, latency_ms, budget_ms)]

    unscored = rank_key(None, None, metric_mode(metric))
    picks: list[str] = []
    for t in ranked:
        if len(picks) < min(init_best, len(ranked)) and within_budget(picks, t, latency_ms, budget_ms):
            picks.append(t)
    running = np.sum([pool[t] for t in picks], axis=0) if picks else np.zeros_like(pool[ids[0]])
    best_key = _key(metric, labels, running / len(picks)) if picks else unscored
    best_len, best_running = len(picks), running.copy()
    while len(picks) < size:
        n = len(picks) + 1
        choice, choice_key = ranked[0], unscored
        for t in ranked:  # the better single trial wins a tie between candidates
            if not within_budget(picks, t, latency_ms, budget_ms):
                continue
            key = _key(metric, labels, (running + pool[t]) / n)
            if key < choice_key:
                choice, choice_key = t, key
        picks.append(choice)
        running = running + pool[choice]
        if choice_key < best_key:
            best_key, best_len, best_running = choice_key, len(picks), running.copy()

    chosen = picks[:best_len]
    members = tuple(dict.fromkeys(chosen))  # first-pick order, no duplicates
    weights = tuple(chosen.count(t) / len(chosen) for t in members)
    score = _metric_fn(metric)(labels, best_running / best_len) if best_len else math.nan
    return EnsembleSelection(members, weights, "greedy", metric, score)


def select_ensemble(
    val_probs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    method: EnsembleMethod,
    size: int,
    metric: str = "log_loss",
    latency_ms: Mapping[str, float] | None = None,
    budget_ms: float | None = None,
    init_best: int = 1,
) -> EnsembleSelection:
    """The selection the config asks for (``search.ensemble_method``, ``search.ensemble_size``,
    ``search.ensemble_init_best`` for greedy selection, and ``search.latency_budget_ms``)."""
    if method == "top_k":
        return select_top_k(val_probs, labels, size, metric, latency_ms, budget_ms)
    if method == "greedy":
        return select_greedy(val_probs, labels, size, metric, init_best, latency_ms, budget_ms)
    raise ConfigError(f"ensemble method must be 'top_k' or 'greedy', got {method!r}")


def no_worse_than_best(
    selection: EnsembleSelection,
    probs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    best_id: str,
    metric: str = "val_accuracy",
) -> tuple[EnsembleSelection, str]:
    """``selection``, or the best member alone when the ensemble does not beat it on ``probs``; and why.

    Both are calibrated first (each its own temperature, fitted on the same predictions) and compared by the
    ranking rule (:func:`~automl_tl.evaluate.ranking.beats`) on the search's ``metric``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if selection.members == (best_id,):
        return selection, f"the selection kept the best member {best_id} alone"
    ens = combine([probs[t] for t in selection.members], selection.weights)
    names = [str(c) for c in range(ens.shape[1])]
    mine, theirs = (
        classification_metrics(labels, apply_temperature(p, fit_temperature(p, labels)), names, top_k=())
        for p in (ens, np.asarray(probs[best_id], dtype=np.float64))
    )
    name = metric.removeprefix("val_")
    shown = f"{name} {metric_value(mine, metric):.4f} vs {metric_value(theirs, metric):.4f}, log loss " \
        f"{mine['log_loss']:.4f} vs {theirs['log_loss']:.4f}"
    if beats(mine, theirs, metric):
        return selection, f"the ensemble beat its best member {best_id} ({shown})"
    why = f"the ensemble of {len(selection.members)} did not beat its best member {best_id} ({shown}): " \
        "the best member is served alone"
    return EnsembleSelection((best_id,), (1.0,), "best_member", selection.metric, selection.val_score), why


# --- the cascade ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CascadeChoice:
    """The cheap member, the calibrated confidence at which it answers alone, and what that did on validation:
    accuracy (and the ensemble's), the share of rows escalated to the ensemble, and the mean latency of a row
    (the cheap member's, plus the other members' for an escalated row)."""

    member: str
    threshold: float
    accuracy: float
    ensemble_accuracy: float
    escalation_rate: float
    expected_latency_ms: float
    tolerance_points: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cascade_threshold(
    first: np.ndarray, then: np.ndarray, labels: np.ndarray, tolerance: float
) -> tuple[float, float, float] | None:
    """The lowest threshold on ``first``'s top probability at which answering those rows with ``first`` and the
    rest with ``then`` loses at most ``tolerance`` (a fraction of the rows) of ``then``'s right answers. Rows
    where ``first`` is right and ``then`` wrong do not pay for losses: such luck on validation is the least
    likely to hold on new images, so accuracy stays within ``tolerance`` of ``then``'s without counting on it.
    Returns (threshold, accuracy, escalation rate), or None when no row can be answered by ``first`` alone.
    Both are calibrated (N, C) probabilities."""
    labels = np.asarray(labels, dtype=np.int64)
    confidence = first.max(axis=1)
    right_first = first.argmax(axis=1) == labels
    right_then = then.argmax(axis=1) == labels
    lost = ~right_first & right_then
    best: tuple[float, float, float] | None = None
    for level in np.unique(confidence)[::-1]:  # highest first: each step lets more rows stop at ``first``
        alone = confidence >= level
        if np.mean(alone & lost) > tolerance + 1e-12:
            break  # losses only grow as the threshold falls
        best = (float(level), float(np.where(alone, right_first, right_then).mean()), float(1.0 - alone.mean()))
    return best


def choose_cascade(
    probs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    temperatures: Mapping[str, float],
    ensemble: EnsembleSelection,
    ensemble_temperature: float,
    latency_ms: Mapping[str, float],
    tolerance_points: float,
) -> CascadeChoice | None:
    """Among trials cheaper than the ensemble, the cheap member and threshold of least expected latency per row
    whose validation accuracy stays within ``tolerance_points`` of the ensemble's; None when none beats the
    ensemble's own latency. An escalated row reuses the cheap member's output when it is an ensemble member."""
    labels = np.asarray(labels, dtype=np.int64)
    then = apply_temperature(combine([probs[t] for t in ensemble.members], ensemble.weights), ensemble_temperature)
    ensemble_ms = sum(latency_ms[t] for t in ensemble.members)
    best: CascadeChoice | None = None
    for t in sorted(probs, key=lambda t: latency_ms[t]):
        if latency_ms[t] >= ensemble_ms:
            break
        first = apply_temperature(np.asarray(probs[t], dtype=np.float64), temperatures[t])
        found = cascade_threshold(first, then, labels, tolerance_points / 100.0)
        if found is None:
            continue
        threshold, accuracy, rate = found
        rest = ensemble_ms - (latency_ms[t] if t in ensemble.members else 0.0)
        choice = CascadeChoice(t, threshold, accuracy, float(np.mean(then.argmax(axis=1) == labels)), rate,
                               latency_ms[t] + rate * rest, tolerance_points)  # fmt: skip
        if choice.expected_latency_ms < ensemble_ms and (best is None or _cheaper(choice, best)):
            best = choice
    return best


def _cheaper(a: CascadeChoice, b: CascadeChoice) -> bool:
    """Less expected latency; on a tie, higher accuracy."""
    return (a.expected_latency_ms, -a.accuracy) < (b.expected_latency_ms, -b.accuracy)

