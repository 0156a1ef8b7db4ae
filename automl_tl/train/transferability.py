"""How well a backbone's frozen features suit a data set, before anything is fine-tuned: LogME, and the rule
that ranks backbones by it.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021) is
the log marginal evidence of a Bayesian linear model from the features to each class's one-hot target, its
prior and noise precisions (alpha, beta) set by maximising that evidence, averaged over samples and classes.
It is chosen over a k-fold linear probe because it needs no hyperparameter, no validation split (the
sweep's validation images stay for choosing trials) and one SVD per backbone; its evidence already pays for
what a probe would overfit. Higher is better; the values are comparable between backbones on one data set,
not between data sets.

Plain numpy: the features come from ``automl_tl.train.features``.

    .venv/bin/python -m pytest -q tests/test_transferability.py
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from automl_tl.inference.transforms import Preprocessing
    from automl_tl.train.trial_data import TrialData

__all__ = ["backbone_scores", "logme", "prune_decisions", "ranking_enabled", "train_logme"]

_MAX_ITERATIONS = 100
_TOLERANCE = 1e-4  # relative change of alpha and beta at which the fixed point counts as reached


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of ``features`` (one row per image) for integer class ``labels``; NaN when the features
    are not finite numbers or there are fewer than two images."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (images, width) with one label per image, got {f.shape} and {y.shape}")
    n, width = f.shape
    if n < 2 or not np.isfinite(f).all():
        return float("nan")
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma2 = s * s  # the non-zero part of F^T F's spectrum; its other (width - len(s)) eigenvalues are 0
    evidences = [_class_evidence(u, sigma2, (y == k).astype(np.float64), width) for k in np.unique(y)]
    return float(np.mean(evidences))


def _class_evidence(u: np.ndarray, sigma2: np.ndarray, target: np.ndarray, width: int) -> float:
    """Log evidence per image of one one-hot column, at the (alpha, beta) that maximise it.

    In the SVD basis of F the posterior mean is diagonal: m_i = beta s_i z_i / (alpha + beta s_i^2) with
    z = U^T t, and the residual F m - t splits into -alpha z_i / (alpha + beta s_i^2) inside F's column space
    plus the part of t outside it. MacKay's fixed point updates alpha = gamma / |m|^2 and
    beta = (n - gamma) / |F m - t|^2, with gamma = sum beta s_i^2 / (alpha + beta s_i^2).
    """
    n = target.size
    z = u.T @ target
    z2 = z * z
    outside = max(float(target @ target - z2.sum()), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(_MAX_ITERATIONS):
        denom = alpha + beta * sigma2
        gamma = float((beta * sigma2 / denom).sum())
        m2 = float((beta * beta * sigma2 * z2 / (denom * denom)).sum())
        residual2 = float((alpha * alpha * z2 / (denom * denom)).sum()) + outside
        new_alpha = gamma / max(m2, 1e-12)
        new_beta = (n - gamma) / max(residual2, 1e-12)
        done = abs(new_alpha / alpha - 1) < _TOLERANCE and abs(new_beta / beta - 1) < _TOLERANCE
        alpha, beta = new_alpha, new_beta
        if done:
            break
    denom = alpha + beta * sigma2
    m2 = float((beta * beta * sigma2 * z2 / (denom * denom)).sum())
    residual2 = float((alpha * alpha * z2 / (denom * denom)).sum()) + outside
    log_det = float(np.log(denom).sum()) + (width - sigma2.size) * np.log(alpha)
    evidence = (
        0.5 * n * np.log(beta) + 0.5 * width * np.log(alpha) - 0.5 * n * np.log(2 * np.pi)
        - 0.5 * beta * residual2 - 0.5 * alpha * m2 - 0.5 * log_det
    )  # fmt: skip
    return float(evidence) / n


_SCORED: dict[str, float | None] = {}  # by feature-cache key: a reused trial actor scores each feature set once


def train_logme(data: TrialData, backbone: str, pre: Preprocessing, train_features: torch.Tensor) -> float | None:
    """The LogME score of a backbone's cached train features (None when it is not a finite number)."""
    from automl_tl.train.features import feature_key

    key = feature_key(data.data_id, backbone, pre, data.train_idx, data.val_idx)
    if key not in _SCORED:
        score = logme(train_features.numpy(), data.labels[data.train_idx])
        _SCORED[key] = round(score, 5) if np.isfinite(score) else None
    return _SCORED[key]


def backbone_scores(observations: Iterable[tuple[str, float | None]]) -> dict[str, float]:
    """One score per backbone from (backbone, score) pairs: its best, the image size that suits it best; pairs
    without a finite score are left out."""
    scores: dict[str, float] = {}
    for backbone, score in observations:
        if score is None or not np.isfinite(score):
            continue
        scores[backbone] = max(score, scores.get(backbone, -np.inf))
    return scores


def prune_decisions(scores: Mapping[str, float], margin: float) -> dict[str, str]:
    """The backbones whose score trails the best by more than ``margin``, each with why.

    A backbone not scored yet is never pruned; the best score known only grows, so a backbone once pruned
    stays pruned as more scores come in.
    """
    if len(scores) < 2:
        return {}
    leader = max(scores, key=lambda name: scores[name])
    best = scores[leader]
    return {
        name: f"LogME {score:.3f} trails {leader} ({best:.3f}) by {best - score:.3f} > margin {margin:g}"
        for name, score in scores.items()
        if best - score > margin
    }


def ranking_enabled(setting: str, n_backbones: int) -> bool:
    """Whether a sweep prunes by rank: ``on``, ``off``, or ``auto`` (on when the space has over two backbones)."""
    if setting == "auto":
        return n_backbones > 2
    return setting == "on"
