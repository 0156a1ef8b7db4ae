"""Data health from image features: likely label errors, near-duplicates, outliers and confusable classes.

Pure numpy on a features matrix (one row per image, e.g. a frozen backbone's pooled features), its labels,
splits and paths; :mod:`automl_tl.data.deep` computes the features and calls :func:`diagnose`. The JSON
shape (``Diagnostics.to_dict``) is fixed so other tools can read it:

    {"label_issues": [{"path", "given", "suggested", "score"}, ...],        most suspect first
     "near_duplicates": [{"paths": [a, b], "similarity", "kind"}, ...],     most similar first
     "outliers": [{"path", "score"}, ...],                                   most unusual first
     "confusable_pairs": [{"classes": [a, b], "rate"}, ...]}                 most confused first

Scores: a label issue's ``score`` is cleanlab's label quality (0..1, low is suspect); an outlier's is its
best cosine similarity to a class's mean feature direction (low is unusual); a pair's ``rate`` is the share of the two
classes' images that the out-of-fold head gives the other class of the pair. ``kind`` is ``cross-class`` when the two
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
    "near_duplicates",
    "near_duplicate_pairs",
    "leaked_rows",
    "format_diagnostics",
    "NEAR_DUPLICATE_SIMILARITY",
]

# Cosine similarity of L2-normalised features at or above which two images count as near-duplicates; below
# it, an image and its nearest neighbour still do when that neighbour stands out from the next by the margin.
NEAR_DUPLICATE_SIMILARITY = 0.9
NEAR_DUPLICATE_FLOOR = 0.6
NEAR_DUPLICATE_MARGIN = 0.08
# Both bars scale with the set's own spread: where every image has a close neighbour (small grey silhouettes,
# which a pretrained network maps close together), a near-duplicate must lie this many times closer than a
# typical nearest neighbour (cosine distance 1 - s, median over the images) ...
NEAR_DUPLICATE_CLOSER = 2.5
# ... and stand out from the runner-up by at least this share of that typical distance.
NEAR_DUPLICATE_MARGIN_SHARE = 0.3
# Up to this many images the neighbour search is exact (blocked matrix products); past it faiss's HNSW.
EXACT_SEARCH_MAX = 20_000
_NEIGHBOURS = 16  # neighbours examined per image
_FOLDS = 5
# Prior logit variances tried for the out-of-fold head. A loose head fits the labels it is given, the wrong
# ones too, and takes hundreds of iterations to; a tight one cannot separate close classes.
_HEAD_LOGIT_VARIANCES = (1.0, 10.0)
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
    path_of = np.asarray(paths).astype(str)
    names = [str(c) for c in class_names]
    notes: list[str] = []
    pairs = near_duplicates(x, labels, splits, path_of, similarity=similarity)
    probs, why = _out_of_fold_probs(x, labels, len(names), seed)
    issues: tuple[LabelIssue, ...] = ()
    confusable: tuple[ConfusablePair, ...] = ()
    if probs is None:
        notes.append(f"label issues and confusable pairs skipped: {why}")
    else:
        issues = _label_issues(probs, labels, path_of, names)
        confusable = _confusable_pairs(probs, labels, names)
    outliers = _outliers(x, labels, path_of)
    return Diagnostics(issues, pairs, outliers, confusable, tuple(notes))


def near_duplicates(
    features: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    splits: Sequence[str] | np.ndarray[Any, Any],
    paths: Sequence[str] | np.ndarray[Any, Any],
    *,
    similarity: float = NEAR_DUPLICATE_SIMILARITY,
) -> tuple[NearDuplicate, ...]:
    """The near-duplicate finding alone (what the leak check needs, without fitting the label-error heads)."""
    x = _normalised(features)
    labels = np.asarray(labels, dtype=np.int64)
    split_of = np.asarray(splits).astype(str)
    path_of = np.asarray(paths).astype(str)
    return tuple(
        NearDuplicate((str(path_of[i]), str(path_of[j])), round(s, 4), _pair_kind(labels, split_of, i, j), (i, j))
        for i, j, s in near_duplicate_pairs(x, similarity)
    )


def near_duplicate_pairs(x: np.ndarray[Any, Any], similarity: float) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of rows of the normalised ``x`` that look like copies of one image, most similar
    first: cosine similarity at or above the bar, or an image whose nearest neighbour is at least
    :data:`NEAR_DUPLICATE_FLOOR` similar and closer than its second nearest by the margin (an altered copy is
    far closer to its original than to anything else, even when cropping and recompression lower their
    similarity). The bar is ``similarity`` and the margin :data:`NEAR_DUPLICATE_MARGIN`, each raised to
    what the set's typical nearest-neighbour distance calls for (:func:`duplicate_bars`)."""
    sims, nbrs = _neighbours(x, min(_NEIGHBOURS, x.shape[0] - 1))
    bar, margin = duplicate_bars(sims, similarity)
    found: dict[tuple[int, int], float] = {}
    for i in range(x.shape[0]):
        runner_up = float(sims[i, 1]) if sims.shape[1] > 1 else -1.0
        for rank, (s, j) in enumerate(zip(sims[i].tolist(), nbrs[i].tolist())):
            stands_out = rank == 0 and s >= NEAR_DUPLICATE_FLOOR and s - runner_up >= margin
            if j >= 0 and (s >= bar or stands_out):
                found[(min(i, j), max(i, j))] = s
    return sorted(((i, j, s) for (i, j), s in found.items()), key=lambda t: (-t[2], t[0], t[1]))


def duplicate_bars(sims: np.ndarray[Any, Any], similarity: float) -> tuple[float, float]:
    """The similarity bar and runner-up margin for a set whose rows' neighbour similarities are ``sims``
    (descending per row): ``similarity`` and :data:`NEAR_DUPLICATE_MARGIN`, or stricter where the set's median
    nearest-neighbour distance is small."""
    if sims.shape[1] == 0:
        return similarity, NEAR_DUPLICATE_MARGIN
    typical = float(np.median(1.0 - sims[:, 0]))
    return (max(similarity, 1.0 - typical / NEAR_DUPLICATE_CLOSER),
            max(NEAR_DUPLICATE_MARGIN, NEAR_DUPLICATE_MARGIN_SHARE * typical))  # fmt: skip


def _neighbours(x: np.ndarray[Any, Any], k: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Each row's ``k`` most similar other rows (similarities descending, then their indices; -1 where
    fewer exist): exact up to :data:`EXACT_SEARCH_MAX` rows, faiss HNSW past it."""
    n = x.shape[0]
    if k < 1:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    if n <= EXACT_SEARCH_MAX:
        sims_out, nbrs_out = [], []
        for start in range(0, n, 1024):
            block = x[start : start + 1024] @ x.T
            block[np.arange(block.shape[0]), np.arange(start, start + block.shape[0])] = -np.inf
            top = np.argpartition(-block, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(block, top, axis=1), axis=1, kind="stable")
            nbrs_out.append(np.take_along_axis(top, order, axis=1))
            sims_out.append(np.take_along_axis(block, nbrs_out[-1], axis=1))
        return np.concatenate(sims_out), np.concatenate(nbrs_out)
    import faiss

    data = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(data)
    sims, nbrs = index.search(data, k + 1)
    keep = nbrs != np.arange(n)[:, None]  # drop each row itself, wherever the search ranked it
    out_s = np.full((n, k), -1.0, np.float32)
    out_n = np.full((n, k), -1, np.int64)
    for i in range(n):
        row_n, row_s = nbrs[i][keep[i]][:k], sims[i][keep[i]][:k]
        out_n[i, : len(row_n)], out_s[i, : len(row_s)] = row_n, row_s
    return out_s, out_n


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
    """Each image's class probabilities from a logistic-regression head fitted on the other folds, on
    features standardised per dimension; of the L2 strengths :data:`_HEAD_LOGIT_VARIANCES`, the one whose
    out-of-fold probabilities have the lowest log loss (the data, not a constant, says how much to hold back)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if present.size < 2:
        return None, "a single class"
    folds = int(min(_FOLDS, present.min()))
    if folds < 2:
        return None, "a class with a single image"
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    standardised = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    tried = []
    for spread in _HEAD_LOGIT_VARIANCES:
        # sklearn's C is the variance of the Gaussian prior on each weight: spread/width gives an image's
        # logit that prior variance however wide the standardised features are.
        head = LogisticRegression(C=spread / x.shape[1], max_iter=500)
        found = cross_val_predict(head, standardised, labels, cv=cv, method="predict_proba")
        tried.append((log_loss(labels, found, labels=np.flatnonzero(counts > 0)), spread, found))
    fold_probs = min(tried, key=lambda t: (t[0], t[1]))[2]
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
    """Class pairs by how often the out-of-fold head mistakes one for the other: (a taken for b + b taken
    for a) / (images of a + images of b)."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, probs.argmax(axis=1)), 1)
    counts = confusion.sum(axis=1)
    out = []
    for a in range(k):
        for b in range(a + 1, k):
            mistaken = int(confusion[a, b] + confusion[b, a])
            if mistaken:
                out.append(ConfusablePair((names[a], names[b]), round(mistaken / int(counts[a] + counts[b]), 6)))
    out.sort(key=lambda p: -p.rate)
    return tuple(out[:_MAX_PAIRS])


def _outliers(x: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], paths: np.ndarray[Any, Any]) -> tuple[Outlier, ...]:
    """Images unlike every class: their best cosine similarity to any class's mean feature direction lies
    far below the usual (a Tukey fence, :data:`_OUTLIER_FENCE` interquartile ranges under the lower quartile)."""
    present = np.unique(labels)
    if x.shape[0] < 4 or present.size == 0:
        return ()
    centres = _normalised(np.stack([x[labels == c].mean(axis=0) for c in present]))
    scores = (x @ centres.T).max(axis=1)
    q1, q3 = np.percentile(scores, [25, 75])
    flagged = np.flatnonzero(scores < q1 - _OUTLIER_FENCE * (q3 - q1))
    flagged = flagged[np.argsort(scores[flagged], kind="stable")]
    return tuple(Outlier(str(paths[i]), round(float(scores[i]), 4)) for i in flagged)
