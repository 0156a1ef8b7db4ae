"""Classification metrics on predicted probabilities, as plain JSON-ready data.

Everything here works on integer ``labels`` of shape (N,) and class ``probs`` of shape (N, C) whose rows
sum to one; the prediction is the arg-max (the first class on ties, like ``np.argmax``). Used for the
sweep's validation metrics, the test scores in ``summary.json`` and ``automl-tl evaluate``.

    .venv/bin/python -c "import numpy as np; from automl_tl.evaluate.metrics import classification_metrics as m; \
print(m(np.array([0, 1]), np.array([[0.9, 0.1], [0.4, 0.6]]), ['ant', 'bee'])['accuracy'])"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PROB_EPS",
    "classification_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "format_metrics_table",
    "log_loss",
    "lookup",
    "reliability_bins",
    "top_k_accuracy",
]

# Probabilities are clipped to [PROB_EPS, 1] before a log: a confident miss costs -log(1e-15) ~ 34.5 nats.
PROB_EPS = 1e-15


def _checked(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must have shape (N, C), got {probs.shape}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},) to match probs, got {labels.shape}")
    if labels.size == 0:
        raise ValueError("metrics need at least one example, got none")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got values {labels.min()}..{labels.max()}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs hold NaN or infinite values")
    return labels.astype(np.int64), probs


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (rows renormalised, clipped at ``PROB_EPS``)."""
    labels, probs = _checked(labels, probs)
    rows = probs / np.clip(probs.sum(axis=1, keepdims=True), PROB_EPS, None)
    true_p = np.clip(rows[np.arange(labels.size), labels], PROB_EPS, 1.0)
    return float(-np.mean(np.log(true_p)))


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of examples whose true class ranks within the first ``k``.

    Ranks follow a stable descending sort, so ties go to the lower class index and top-1 equals accuracy.
    """
    labels, probs = _checked(labels, probs)
    true_p = probs[np.arange(labels.size), labels][:, None]
    index = np.arange(probs.shape[1])[None, :]
    ahead = (probs > true_p) | ((probs == true_p) & (index < labels[:, None]))
    return float(np.mean(ahead.sum(axis=1) < k))


def _confidence_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bins are (lo, hi]; a confidence of exactly 0 falls into the first one.
    which = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(which, weights=correct, minlength=n_bins)
    return count, conf_sum, correct_sum


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE: |accuracy - mean confidence| per equal-width confidence bin, weighted by the bin's share."""
    labels, probs = _checked(labels, probs)
    count, conf_sum, correct_sum = _confidence_bins(labels, probs, n_bins)
    return float(np.sum(np.abs(correct_sum - conf_sum)) / labels.size)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """The reliability diagram behind the ECE: one entry per bin; empty bins have ``None`` averages."""
    labels, probs = _checked(labels, probs)
    count, conf_sum, correct_sum = _confidence_bins(labels, probs, n_bins)
    bins = []
    for i in range(n_bins):
        n = int(count[i])
        bins.append(
            {
                "lower": i / n_bins,
                "upper": (i + 1) / n_bins,
                "count": n,
                "confidence": float(conf_sum[i] / n) if n else None,
                "accuracy": float(correct_sum[i] / n) if n else None,
            }
        )
    return bins


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den with 0 where den is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    top_k: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Every metric of a labelled prediction, JSON-ready.

    Macro averages run over the classes that occur in ``labels`` or in the predictions (scikit-learn's
    default); an undefined precision, recall or F1 counts as 0. Weighted averages weight by support.
    ``top_k_accuracy`` has string keys ("1", "5") and only the ``k`` below the class count, where it says
    something. The confusion matrix has true classes as rows, predicted classes as columns.
    """
    labels, probs = _checked(labels, probs)
    num_classes = probs.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for probabilities of {num_classes} classes")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    seen = (support > 0) | (predicted > 0)
    share = support / support.sum()
    names = [str(n) for n in class_names]

    def averaged(values: np.ndarray) -> dict[str, Any]:
        return {
            "macro": float(values[seen].mean()),
            "weighted": float(np.sum(values * share)),
            "per_class": {name: float(v) for name, v in zip(names, values)},
        }

    return {
        "n": int(labels.size),
        "class_names": names,
        "accuracy": float(np.mean(preds == labels)),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "precision": averaged(precision),
        "recall": averaged(recall),
        "f1": averaged(f1),
        "support": {name: int(s) for name, s in zip(names, support)},
        "top_k_accuracy": {str(k): top_k_accuracy(labels, probs, k) for k in sorted(set(top_k)) if 0 < k < num_classes},
        "log_loss": log_loss(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "confusion_matrix": cm.tolist(),
    }


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "acc"),
    ("balanced_accuracy", "bal_acc"),
    ("f1.macro", "f1_macro"),
    ("top_k_accuracy.5", "top5"),
    ("log_loss", "log_loss"),
    ("ece", "ece"),
    ("n", "n"),
)


def lookup(metrics: Mapping[str, Any] | None, dotted: str) -> Any:
    """``metrics["a"]["b"]`` for ``"a.b"``; None where any part is missing."""
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def format_metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A short terminal table, one row per named metrics dict, e.g. ``{"best": m1, "ensemble": m2}``.

    Columns that no row has (top-5 with fewer than six classes) are left out.
    """
    columns = [(key, title) for key, title in _COLUMNS if any(lookup(m, key) is not None for m in rows.values())]
    name_width = max([len(name) for name in rows] + [4])
    widths = [max(len(title), 8) for _, title in columns]
    lines = [f"{'':<{name_width}}" + "".join(f"  {title:>{w}}" for (_, title), w in zip(columns, widths))]
    for name, metrics in rows.items():
        cells = []
        for (key, _), w in zip(columns, widths):
            value = lookup(metrics, key)
            if value is None:
                text = "-"
            elif isinstance(value, int) and not isinstance(value, bool):
                text = str(value)
            else:
                text = f"{float(value):.4f}"
            cells.append(f"  {text:>{w}}")
        lines.append(f"{name:<{name_width}}" + "".join(cells))
    return "\n".join(lines)
