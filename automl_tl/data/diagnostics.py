"""Data health from image features: likely label errors, near-duplicates, outliers and confusable classes.

Pure numpy on a features matrix (one row per image, e.g. a frozen backbone's pooled features), its labels,
splits and paths; :mod:`automl_tl.data.deep` computes the features and calls :func:`diagnose`. The JSON
shape (``Diagnostics.to_dict``) is fixed so other tools can read it:

    {"label_issues": [{"path", "given", "suggested", "score"}, ...],        most suspect first
     "near_duplicates": [{"paths": [a, b], "similarity", "kind"}, ...],     most similar first
     "outliers": [{"path", "score"}, ...],                                   most unusual first
     "confusable_pairs": [{"classes": [a, b], "rate"}, ...]}                 most confused first

Scores: a label issue's ``score`` is cleanlab's label quality (0..1, low is suspect); an outlier's is
cleanlab's out-of-distribution score (0..1, low is unusual); a pair's ``rate`` is cleanlab's joint
probability that an image of one class is labelled the other. ``kind`` is ``cross-class`` when the two
images carry different labels, else ``cross-split`` when they sit in different splits (leakage), else
``within-class``. Label errors use out-of-fold probabilities of a k-fold logistic-regression head, so no
image is scored by a head that saw its label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "Diagnostics",
    "LabelIssue",
    "NearDuplicate",
    "Outlier",
    "ConfusablePair",
    "diagnose",
    "near_duplicate_pairs",
    "leaked_rows",
    "format_diagnostics",
    "NEAR_DUPLICATE_SIMILARITY",
]

# Cosine similarity of L2-normalised features at or above which two images count as near-duplicates.
NEAR_DUPLICATE_SIMILARITY = 0.9
# Up to this many images the similarity search is exact (blocked matrix products); past it faiss's HNSW.
EXACT_SEARCH_MAX = 20_000
_NEIGHBOURS = 16  # approximate search: neighbours examined per image
_FOLDS = 5
_MAX_PAIRS = 20  # confusable pairs listed
_OUTLIER_FENCE = 3.0  # interquartile ranges below the lower quartile of the OOD scores


@dataclasses.dataclass(frozen=True)
class LabelIssue:
    path: str
    given: str
    suggested: str
    score: float


@dataclasses.dataclass(frozen=True)
class NearDuplicate:
    paths: tuple[str, str]
    similarity: float
    kind: str  # within-class | cross-class | cross-split
    rows: tuple[int, int] = dataclasses.field(default=(0, 0), compare=False)


@dataclasses.dataclass(frozen=True)
class Outlier:
    path: str
    score: float


@dataclasses.dataclass(frozen=True)
class ConfusablePair:
    classes: tuple[str, str]
    rate: float


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    label_issues: tuple[LabelIssue, ...]
    near_duplicates: tuple[NearDuplicate, ...]
    outliers: tuple[Outlier, ...]
    confusable_pairs: tuple[ConfusablePair, ...]
    notes: tuple[str, ...] = ()  # findings that could not be computed, and why

    def to_dict(self) -> dict[str, Any]:
        """The fixed JSON shape (module docstring); ``notes`` only when there are any."""
        out: dict[str, Any] = {
            "label_issues": [dataclasses.asdict(i) for i in self.label_issues],
            "near_duplicates": [
                {"paths": list(d.paths), "similarity": d.similarity, "kind": d.kind} for d in self.near_duplicates
            ],
            "outliers": [dataclasses.asdict(o) for o in self.outliers],
            "confusable_pairs": [{"classes": list(p.classes), "rate": p.rate} for p in self.confusable_pairs],
        }
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def diagnose(
    features: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    splits: Sequence[str] | np.ndarray[Any, Any],
    paths: Sequence[str] | np.ndarray[Any, Any],
    class_names: Sequence[str],
    *,
    seed: int = 0,
    similarity: float = NEAR_DUPLICATE_SIMILARITY,
) -> Diagnostics:
    """All four findings for the images whose features are the rows of ``features``."""
    x = _normalised(features)
    labels = np.asarray(labels, dtype=np.int64)
    split_of = np.asarray(splits).astype(str)
    path_of = np.asarray(paths).astype(str)
    names = [str(c) for c in class_names]
    notes: list[str] = []
    pairs = tuple(
        NearDuplicate((path_of[i], path_of[j]), round(s, 4), _pair_kind(labels, split_of, i, j), (i, j))
        for i, j, s in near_duplicate_pairs(x, similarity)
    )
    probs, why = _out_of_fold_probs(x, labels, len(names), seed)
    issues: tuple[LabelIssue, ...] = ()
    confusable: tuple[ConfusablePair, ...] = ()
    if probs is None:
        notes.append(f"label issues and confusable pairs skipped: {why}")
    else:
        issues = _label_issues(probs, labels, path_of, names)
        confusable = _confusable_pairs(probs, labels, names)
    outliers = _outliers(x, path_of)
    return Diagnostics(issues, pairs, outliers, confusable, tuple(notes))


def near_duplicate_pairs(x: np.ndarray[Any, Any], similarity: float) -> list[tuple[int, int, float]]:
    """Every pair (i < j) of rows of the normalised ``x`` with cosine similarity >= ``similarity``,
    most similar first: exact up to :data:`EXACT_SEARCH_MAX` rows, faiss HNSW past it."""
    n = x.shape[0]
    found: dict[tuple[int, int], float] = {}
    if n <= EXACT_SEARCH_MAX:
        block = 1024
        for start in range(0, n, block):
            sims = x[start : start + block] @ x.T
            for a, b in zip(*np.nonzero(sims >= similarity)):
                i, j = start + int(a), int(b)
                if i < j:
                    found[(i, j)] = float(sims[a, b])
    else:
        import faiss

        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.add(np.ascontiguousarray(x, dtype=np.float32))
        sims, nbrs = index.search(np.ascontiguousarray(x, dtype=np.float32), _NEIGHBOURS + 1)
        for i, (row_s, row_n) in enumerate(zip(sims, nbrs)):
            for s, j in zip(row_s, row_n):
                if j >= 0 and int(j) != i and s >= similarity:
                    found[(min(i, int(j)), max(i, int(j)))] = float(s)
    return sorted(((i, j, s) for (i, j), s in found.items()), key=lambda t: (-t[2], t[0], t[1]))


def leaked_rows(pairs: Sequence[NearDuplicate], splits: Sequence[str] | np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Rows in val or test that nearly duplicate a train image: what ``data.near_duplicates:
    drop-across-splits`` takes out of those splits. Ascending row indices."""
    split_of = np.asarray(splits).astype(str)
    out = set()
    for pair in pairs:
        i, j = pair.rows
        for held, other in ((i, j), (j, i)):
            if split_of[held] in ("val", "test") and split_of[other] == "train":
                out.add(held)
    return np.asarray(sorted(out), dtype=np.int64)


def format_diagnostics(diag: Diagnostics, limit: int = 20) -> str:
    """The findings as terminal lines, ``limit`` of each kind (the JSON holds everything)."""
    lines = [f"likely label errors: {len(diag.label_issues)}"]
    lines += [f"  {i.path}: labelled {i.given}, looks like {i.suggested} (quality {i.score:.3f})" for i in diag.label_issues[:limit]]
    kinds = {k: sum(d.kind == k for d in diag.near_duplicates) for k in ("within-class", "cross-class", "cross-split")}
    lines.append(f"near-duplicates: {len(diag.near_duplicates)} pairs (" + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")")
    lines += [f"  [{d.kind}] {d.paths[0]} ~ {d.paths[1]} (similarity {d.similarity:.3f})" for d in diag.near_duplicates[:limit]]
    lines.append(f"outliers: {len(diag.outliers)}")
    lines += [f"  {o.path} (score {o.score:.3f})" for o in diag.outliers[:limit]]
    lines.append(f"confusable class pairs: {len(diag.confusable_pairs)}")
    lines += [f"  {p.classes[0]} / {p.classes[1]}: {p.rate:.4f}" for p in diag.confusable_pairs[:limit]]
    lines += [f"note: {n}" for n in diag.notes]
    return "\n".join(lines)


def _normalised(features: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _pair_kind(labels: np.ndarray[Any, Any], splits: np.ndarray[Any, Any], i: int, j: int) -> str:
    if labels[i] != labels[j]:
        return "cross-class"
    return "cross-split" if splits[i] != splits[j] else "within-class"


def _out_of_fold_probs(
    x: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], num_classes: int, seed: int
) -> tuple[np.ndarray[Any, Any] | None, str]:
    """Each image's class probabilities from a logistic-regression head fitted on the other folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if present.size < 2:
        return None, "a single class"
    folds = int(min(_FOLDS, present.min()))
    if folds < 2:
        return None, "a class with a single image"
    head = LogisticRegression(C=1.0, max_iter=500)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    fold_probs = cross_val_predict(head, x * np.sqrt(x.shape[1]), labels, cv=cv, method="predict_proba")
    probs = np.zeros((x.shape[0], num_classes))
    probs[:, np.flatnonzero(counts > 0)] = fold_probs  # classes with no image get probability 0
    return probs, ""


def _label_issues(
    probs: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], paths: np.ndarray[Any, Any], names: Sequence[str]
) -> tuple[LabelIssue, ...]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.flatnonzero(np.bincount(labels, minlength=len(names)) > 0)
    local = np.searchsorted(present, labels)  # cleanlab wants every class it is told of to have an image
    sub = probs[:, present] / np.maximum(probs[:, present].sum(axis=1, keepdims=True), 1e-12)
    scores = get_label_quality_scores(local, sub)
    ranked = find_label_issues(local, sub, return_indices_ranked_by="self_confidence")
    suggested = present[sub.argmax(axis=1)]
    return tuple(
        LabelIssue(str(paths[i]), names[int(labels[i])], names[int(suggested[i])], round(float(scores[i]), 4))
        for i in ranked
    )


def _confusable_pairs(
    probs: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], names: Sequence[str]
) -> tuple[ConfusablePair, ...]:
    from cleanlab.dataset import find_overlapping_classes

    present = np.flatnonzero(np.bincount(labels, minlength=len(names)) > 0)
    local = np.searchsorted(present, labels)
    sub = probs[:, present] / np.maximum(probs[:, present].sum(axis=1, keepdims=True), 1e-12)
    table = find_overlapping_classes(local, sub)
    out = []
    for a, b, rate in zip(table["Class Index A"], table["Class Index B"], table["Joint Probability"]):
        if rate > 0:
            out.append(ConfusablePair((names[int(present[a])], names[int(present[b])]), round(float(rate), 6)))
    return tuple(out[:_MAX_PAIRS])


def _outliers(x: np.ndarray[Any, Any], paths: np.ndarray[Any, Any]) -> tuple[Outlier, ...]:
    """Images far below the usual out-of-distribution score (cleanlab's k-nearest-neighbour score)."""
    from cleanlab.outlier import OutOfDistribution

    if x.shape[0] < 3:
        return ()
    k = int(min(10, x.shape[0] - 1))
    scores = OutOfDistribution(params={"k": k}).fit_score(features=x, verbose=False)
    q1, q3 = np.percentile(scores, [25, 75])
    fence = q1 - _OUTLIER_FENCE * (q3 - q1)
    flagged = np.flatnonzero(scores < fence)
    flagged = flagged[np.argsort(scores[flagged], kind="stable")]
    return tuple(Outlier(str(paths[i]), round(float(scores[i]), 4)) for i in flagged)
