"""A finished search as typed values: leaderboard rows, the best trial, the ensemble and their metrics.

Built from what the run directory records (``summary.json`` after
:func:`automl_tl.evaluate.results.build_results`), so a search just run and one read back later look alike.

>>> m = Metrics.from_dict({"n": 2, "accuracy": 1.0, "balanced_accuracy": 1.0, "f1": {"macro": 1.0},
...                        "log_loss": 0.1, "ece": 0.05, "class_names": ["a", "b"],
...                        "confusion_matrix": [[1, 0], [0, 1]]})
>>> m.accuracy, m.macro_f1, m.confusion_matrix
(1.0, 1.0, ((1, 0), (0, 1)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from automl_tl.train.loop import HYPERPARAMETERS

__all__ = ["BestTrial", "EnsembleResult", "LeaderboardRow", "Metrics"]


def _number(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Classification metrics of one model on one split (``details`` keeps every figure computed: per-class
    precision, recall and F1, support, top-k accuracy)."""

    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    log_loss: float
    ece: float
    class_names: tuple[str, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]
    details: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, metrics: Mapping[str, Any]) -> Metrics:
        """From :func:`automl_tl.evaluate.metrics.classification_metrics`' dictionary."""
        return cls(
            n=int(metrics["n"]),
            accuracy=float(metrics["accuracy"]),
            balanced_accuracy=float(metrics["balanced_accuracy"]),
            macro_f1=float(metrics["f1"]["macro"]),
            log_loss=float(metrics["log_loss"]),
            ece=float(metrics["ece"]),
            class_names=tuple(str(c) for c in metrics["class_names"]),
            confusion_matrix=tuple(tuple(int(x) for x in row) for row in metrics["confusion_matrix"]),
            details=dict(metrics),
        )

    @classmethod
    def maybe(cls, metrics: Mapping[str, Any] | None) -> Metrics | None:
        return None if metrics is None else cls.from_dict(metrics)


@dataclasses.dataclass(frozen=True)
class LeaderboardRow:
    """One trial of the sweep: its rank, hyperparameters (:data:`HYPERPARAMETERS`) and best validation scores."""

    rank: int
    trial_id: str
    params: Mapping[str, Any]
    val_accuracy: float | None
    val_macro_f1: float | None
    val_log_loss: float | None
    best_epoch: int | None
    epochs_run: int
    stop_reason: str
    wall_s: float
    has_model: bool

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> LeaderboardRow:
        """From a leaderboard row as the sweep records it (``summary.json``'s ``trials``)."""
        return cls(
            rank=int(row["rank"]),
            trial_id=str(row["trial_id"]),
            params={name: row.get(name) for name in HYPERPARAMETERS},
            val_accuracy=_number(row.get("best_val_accuracy")),
            val_macro_f1=_number(row.get("best_val_macro_f1")),
            val_log_loss=_number(row.get("best_val_log_loss")),
            best_epoch=None if row.get("best_epoch") is None else int(row["best_epoch"]),
            epochs_run=int(row.get("epochs_run") or 0),
            stop_reason=str(row.get("stop_reason") or ""),
            wall_s=float(row.get("wall_s") or 0.0),
            has_model=bool(row.get("has_model")),
        )


@dataclasses.dataclass(frozen=True)
class BestTrial:
    """The best single trial: its hyperparameters, its calibration temperature and calibrated metrics."""

    trial_id: str
    params: Mapping[str, Any]
    temperature: float
    val: Metrics
    test: Metrics | None  # None when the data had no test split

    @classmethod
    def from_dict(cls, best: Mapping[str, Any]) -> BestTrial:
        """From ``summary.json``'s ``best`` after build_results."""
        return cls(
            trial_id=str(best["trial_id"]),
            params=dict(best["config"]),
            temperature=float(best["temperature"]),
            val=Metrics.from_dict(best["val_calibrated"]),
            test=Metrics.maybe(best.get("test")),
        )


@dataclasses.dataclass(frozen=True)
class EnsembleResult:
    """The ensemble chosen on validation: members, weights, temperature, metrics, and whether it ranks above
    the best single trial on the search's metric (on test when there is a test split)."""

    method: str
    members: tuple[str, ...]
    weights: tuple[float, ...]
    temperature: float
    val: Metrics
    test: Metrics | None
    beat_best: bool

    @classmethod
    def from_dict(cls, ensemble: Mapping[str, Any]) -> EnsembleResult:
        """From ``summary.json``'s ``ensemble`` after build_results."""
        return cls(
            method=str(ensemble["method"]),
            members=tuple(str(m) for m in ensemble["members"]),
            weights=tuple(float(w) for w in ensemble["weights"]),
            temperature=float(ensemble["temperature"]),
            val=Metrics.from_dict(ensemble["val"]),
            test=Metrics.maybe(ensemble.get("test")),
            beat_best=bool(ensemble["beat_best"]),
        )
