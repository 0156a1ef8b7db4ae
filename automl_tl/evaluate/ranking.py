"""How anything scored ranks: on the search's metric in its own direction, ties to the lower log loss.

One rule for every comparison the product makes: a trial's epochs (which one is its best), the trials of a
sweep (the leaderboard), the candidates of an ensemble selection, and the ensemble against the best single
trial. Ties on the metric are common with small validation sets (several trials score 36/36); the lower log
loss then wins, since it belongs to the better calibrated of the equally scored models.

>>> rank_key(0.9, 0.30, "max") < rank_key(0.9, 0.35, "max") < rank_key(0.8, 0.10, "max")
True
>>> beats({"accuracy": 0.8, "log_loss": 0.2}, {"accuracy": 0.9, "log_loss": 0.5}, "val_log_loss")
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["Mode", "beats", "metric_mode", "metric_value", "rank_key", "rank_rows"]

Mode = Literal["max", "min"]


def metric_mode(metric: str) -> Mode:
    """The direction in which ``metric`` improves: down for log loss, up for every other metric.

    ``metric`` may carry the search's ``val_`` prefix (``val_accuracy``) or not (``accuracy``).
    """
    return "min" if metric.removeprefix("val_") == "log_loss" else "max"


def rank_key(score: float | None, log_loss: float | None, mode: Mode) -> tuple[bool, float, float]:
    """Sort key, smallest first = best first: scored before unscored, the score in ``mode``'s direction,
    then the lower log loss."""
    if score is None or not math.isfinite(score):
        return True, 0.0, math.inf
    loss = log_loss if log_loss is not None and math.isfinite(log_loss) else math.inf
    return False, -score if mode == "max" else score, loss


def metric_value(metrics: Mapping[str, Any], metric: str) -> float:
    """``metric`` (``val_`` prefix or not) read from a :func:`classification_metrics` dictionary."""
    name = metric.removeprefix("val_")
    if name == "macro_f1":
        return float(metrics["f1"]["macro"])
    return float(metrics[name])


def beats(candidate: Mapping[str, Any], incumbent: Mapping[str, Any], metric: str) -> bool:
    """Whether ``candidate``'s classification metrics rank strictly above ``incumbent``'s on ``metric``."""
    mode = metric_mode(metric)
    mine = rank_key(metric_value(candidate, metric), candidate.get("log_loss"), mode)
    theirs = rank_key(metric_value(incumbent, metric), incumbent.get("log_loss"), mode)
    return mine < theirs


def rank_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Leaderboard rows best first, each given its ``rank``; trials without a finished epoch last.

    A row holds ``best_<metric>`` and ``best_val_log_loss`` (None for a trial that finished no epoch).
    """
    mode = metric_mode(metric)
    ranked = sorted(rows, key=lambda row: rank_key(row.get(f"best_{metric}"), row.get("best_val_log_loss"), mode))
    for rank, row in enumerate(ranked, start=1):
        row["rank"] = rank
    return ranked
