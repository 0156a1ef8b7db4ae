"""Which images a data set keeps, and which split each one is in.

Duplicates: identical files (same sha256) in one class are kept once, preferring a copy the source placed
in test, then val, then train, so an image never sits on both sides of a split. Identical files filed under
different classes (label conflicts) are all left out: their true label is unknown. ``data.drop_duplicates:
false`` keeps every copy.

Splits: splits the source gives are honoured. With none given, val and test are drawn per class
(stratified) with ``data.seed``; when the source gives some splits but no val, val is drawn from train; a
missing test split stays empty (pass a separate test set, or a ``test/`` folder). Draws order images by
a hash of (seed, content hash), never by listing order, so the same data and seed split the same way on any
machine and in any folder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from automl_tl.errors import DatasetError

SPLITS: tuple[str, ...] = ("train", "val", "test")
_KEEP_PREFERENCE = {"test": 0, "val": 1, "train": 2, "": 3}


@dataclasses.dataclass(frozen=True)
class DuplicateRows:
    """Rows (of the cache file) holding one identical image, and the rows of it the data set keeps."""

    id: str
    rows: tuple[int, ...]
    kept: tuple[int, ...]


def select_rows(
    ok_rows: np.ndarray[Any, Any],
    ids: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    given: np.ndarray[Any, Any],
    drop_duplicates: bool,
) -> tuple[np.ndarray[Any, Any], list[DuplicateRows]]:
    """The rows the data set uses, and every group of identical images among the readable rows."""
    if ok_rows.size == 0:
        return ok_rows, []
    _, inverse, counts = np.unique(ids[ok_rows], return_inverse=True, return_counts=True)
    keep = np.ones(ok_rows.size, dtype=bool)
    groups: list[DuplicateRows] = []
    for g in np.flatnonzero(counts > 1):
        members = np.flatnonzero(inverse == g)
        rows = ok_rows[members]
        if not drop_duplicates:
            kept: tuple[int, ...] = tuple(int(r) for r in rows)
        elif len(set(labels[rows].tolist())) > 1:
            kept = ()
        else:
            best = min(rows.tolist(), key=lambda r: (_KEEP_PREFERENCE[str(given[r])], r))
            kept = (int(best),)
        keep[members] = np.isin(rows, kept)
        groups.append(DuplicateRows(str(ids[rows[0]]), tuple(int(r) for r in rows), kept))
    return ok_rows[keep], groups


def check_classes(labels: np.ndarray[Any, Any], class_names: Sequence[str], what: str) -> None:
    """At least one image, and at least two classes."""
    if labels.size == 0:
        raise DatasetError(f"no images in {what}")
    refuse(class_count_problems(labels, class_names, what))


def class_count_problems(labels: np.ndarray[Any, Any], class_names: Sequence[str], what: str) -> list[str]:
    """Why the images cannot train a classifier, whatever the split: fewer than two classes."""
    present = sorted({class_names[i] for i in np.unique(labels).tolist()})
    if len(class_names) < 2 or len(present) < 2:
        only = present[0] if present else class_names[0] if class_names else "-"
        return [f"{what} has a single class ({only!r}); a classifier needs at least 2 classes"]
    return []


def order_keys(ids: Sequence[str], seed: int) -> np.ndarray[Any, Any]:
    """A per-image draw order: splitmix64 of the first 8 bytes of the content hash, mixed with the seed.

    Plain integer arithmetic on the content: the same on every machine, whatever the listing order.
    """
    prefix = np.frombuffer(bytes.fromhex("".join(i[:16] for i in ids)), dtype=">u8").astype(np.uint64)
    return _splitmix64(prefix ^ _splitmix64(np.array([seed], dtype=np.uint64))[0])


def _splitmix64(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def refuse(problems: list[str]) -> None:
    """Raise every problem at once (a search cannot run on them); nothing when there is none."""
    if problems:
        raise DatasetError("; ".join(problems))


def draw_splits(
    keys: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    given: np.ndarray[Any, Any],
    class_names: Sequence[str],
    *,
    val_fraction: float,
    test_fraction: float,
) -> tuple[np.ndarray[Any, Any], list[str]]:
    """The split of every image, drawing in ``keys`` order (see :func:`order_keys`) where the source gave
    none, and the problem of each class that cannot be split (such a class stays wholly in train): what
    ``inspect`` reports and ``search`` refuses (:func:`refuse`)."""
    given_set = {str(s) for s in np.unique(given).tolist()} - {""}
    out = np.where(given == "", "train", given).astype("<U5")
    drawn = drawn_splits(given_set, test_fraction)
    draw_val, draw_test = "val" in drawn, "test" in drawn
    problems: list[str] = []
    if drawn:
        pool = np.flatnonzero(out == "train")
        for c, name in enumerate(class_names):
            members = pool[labels[pool] == c]
            n = members.size
            n_test = max(1, _round(n * test_fraction)) if draw_test else 0
            n_val = max(1, _round(n * val_fraction)) if draw_val else 0
            where = "" if not given_set else " in the train split"
            if n == 0:
                problems.append(
                    f"class {name!r} has no usable image{where}: its folder is empty or every file in it was "
                    "skipped (`automl-tl inspect DATA` lists why)"
                )
            elif n - n_test - n_val < 1:
                problems.append(
                    f"class {name!r} has {n} image(s){where}, fewer than the split needs: at least "
                    f"{n_test + n_val + 1} (1 train, {n_val} val, {n_test} test) with "
                    f"val_fraction={val_fraction}, test_fraction={test_fraction if draw_test else 0}"
                )
            else:
                order = members[np.lexsort((members, keys[members]))]
                out[order[:n_test]] = "test"
                out[order[n_test : n_test + n_val]] = "val"
    if not problems:
        problems = _coverage_problems(out, labels, class_names)
    return out, problems


def drawn_splits(given: set[str] | frozenset[str], test_fraction: float) -> tuple[str, ...]:
    """The splits drawn with the seed when the source gives the splits ``given``."""
    if not given:
        return ("val", "test") if test_fraction > 0 else ("val",)
    return () if "val" in given else ("val",)


def _coverage_problems(splits: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], class_names: Sequence[str]) -> list[str]:
    """Every class in train, and in every split that is not empty."""
    problems = []
    for split in SPLITS:
        in_split = splits == split
        if split != "train" and not in_split.any():
            continue
        counts = np.bincount(labels[in_split], minlength=len(class_names))
        for c in np.flatnonzero(counts == 0):
            total = int((labels == c).sum())
            problems.append(
                f"class {class_names[int(c)]!r} has no images in the {split} split ({total} image(s) in all); "
                f"every class needs at least 1 image in each split"
            )
    return problems


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(math.floor(x + 0.5))
