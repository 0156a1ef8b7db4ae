"""Data diagnostics: each finding on a small planted set, synthetic features first, then real images with
planted altered copies, flipped labels and an outlier through the registered backbone's features."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from automl_tl.config import DataConfig
from automl_tl.data import diagnostics as diag
from automl_tl.data.diagnostics import diagnose, leaked_rows, near_duplicate_pairs
from tests.scenarios.planted import plant


def clusters(seed: int = 0, per_class: int = 40, dim: int = 32, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian classes (unit-norm centres), ``per_class`` points each."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, 3)))[0].T * 3.0
    x = np.concatenate([c + spread * rng.normal(size=(per_class, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(3), per_class)


def names(n: int) -> list[str]:
    return [f"img{i}.jpg" for i in range(n)]


def test_json_shape_is_the_documented_one() -> None:
    x, y = clusters()
    found = diagnose(x, y, ["train"] * len(y), names(len(y)), ["a", "b", "c"]).to_dict()
    assert set(found) == {"label_issues", "near_duplicates", "outliers", "confusable_pairs"}
    x[1] = x[0] * 1.01
    y[5] = 1
    found = json.loads(json.dumps(diagnose(x, y, ["train"] * len(y), names(len(y)), ["a", "b", "c"]).to_dict()))
    assert set(found["label_issues"][0]) == {"path", "given", "suggested", "score"}
    assert found["near_duplicates"][0] == {"paths": ["img0.jpg", "img1.jpg"], "similarity": 1.0, "kind": "within-class"}


def test_flipped_labels_rank_first_with_their_true_class() -> None:
    x, y = clusters(seed=1)
    flipped = [3, 50, 97]
    given = y.copy()
    given[flipped] = (y[flipped] + 1) % 3
    found = diagnose(x, given, ["train"] * len(y), names(len(y)), ["a", "b", "c"])
    top = found.label_issues[: 2 * len(flipped)]
    assert {f"img{i}.jpg" for i in flipped} <= {i.path for i in top}
    by_path = {i.path: i for i in found.label_issues}
    assert [by_path[f"img{i}.jpg"].suggested for i in flipped] == [["a", "b", "c"][int(y[i])] for i in flipped]
    scores = [i.score for i in found.label_issues]
    assert scores == sorted(scores)  # most suspect (lowest label quality) first


def test_near_duplicate_kinds_and_the_leak_rule() -> None:
    x, y = clusters(seed=2)
    rng = np.random.default_rng(0)
    splits = np.array(["train"] * len(y), dtype="<U5")
    for a, b in ((0, 1), (10, 45), (20, 21)):  # within-class, cross-class, cross-split
        x[b] = x[a] + 0.01 * rng.normal(size=x.shape[1])
    y[45] = 1  # a copy of a class-a image filed under b
    splits[21] = "test"
    found = diagnose(x, y, splits, names(len(y)), ["a", "b", "c"])
    kinds = {d.paths: d.kind for d in found.near_duplicates}
    assert kinds == {("img0.jpg", "img1.jpg"): "within-class", ("img10.jpg", "img45.jpg"): "cross-class",
                     ("img20.jpg", "img21.jpg"): "cross-split"}  # fmt: skip
    assert leaked_rows(found.near_duplicates, splits).tolist() == [21]


def test_approximate_search_past_the_exact_size_finds_the_same_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 48)).astype(np.float32)
    x[100:110] = x[:10] + 0.02 * rng.normal(size=(10, 48))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = near_duplicate_pairs(x, 0.9)
    assert [s for _, _, s in exact] == sorted((s for _, _, s in exact), reverse=True)
    assert sorted((i, j) for i, j, _ in exact) == [(i, i + 100) for i in range(10)]
    monkeypatch.setattr(diag, "EXACT_SEARCH_MAX", 0)  # the size past which faiss answers
    approx = near_duplicate_pairs(x, 0.9)
    assert sorted((i, j) for i, j, _ in approx) == sorted((i, j) for i, j, _ in exact)


def test_where_every_image_has_a_close_neighbour_only_real_copies_are_pairs() -> None:
    # All images share most of their features (as small grey silhouettes do in a pretrained network's
    # space): every pair is about 0.92 similar, which a fixed 0.9 bar would take for copies.
    rng = np.random.default_rng(5)
    common = rng.normal(size=64)
    x = common + 0.3 * rng.normal(size=(300, 64)) * np.linalg.norm(common) / 8
    x[299] = x[7] + 0.01 * rng.normal(size=64)  # one real copy
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    sims = x @ x.T
    assert np.median(sims[np.triu_indices(300, 1)]) > 0.9
    assert [(i, j) for i, j, _ in near_duplicate_pairs(x, 0.9)] == [(7, 299)]


def test_an_image_unlike_every_class_is_an_outlier() -> None:
    x, y = clusters(seed=4)
    x[7] = np.random.default_rng(9).normal(size=x.shape[1]) * 3.0
    found = diagnose(x, y, ["train"] * len(y), names(len(y)), ["a", "b", "c"])
    assert [o.path for o in found.outliers][:1] == ["img7.jpg"]


def test_overlapping_classes_are_the_most_confusable_pair() -> None:
    x, y = clusters(seed=5, spread=0.2)
    rng = np.random.default_rng(1)
    x[y == 1] = x[y == 0][rng.permutation(40)] + 0.5 * rng.normal(size=(40, x.shape[1]))  # b drawn like a
    found = diagnose(x, y, ["train"] * len(y), names(len(y)), ["a", "b", "c"])
    assert found.confusable_pairs[0].classes in {("a", "b"), ("b", "a")}
    assert all(set(p.classes) != {"a", "c"} or p.rate < found.confusable_pairs[0].rate for p in found.confusable_pairs)


def test_a_single_class_is_noted_not_fatal() -> None:
    x, _ = clusters()
    found = diagnose(x[:30], np.zeros(30, dtype=np.int64), ["train"] * 30, names(30), ["only", "empty"])
    assert found.label_issues == () and "a single class" in found.notes[0]


# ------------------------------------------------------------ real images, the registered backbone


@pytest.fixture(scope="module")
def planted_set(hymenoptera_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, str]:
    from automl_tl.data import load_dataset
    from automl_tl.data.deep import diagnose_dataset

    tmp = tmp_path_factory.mktemp("planted")
    planted = plant(hymenoptera_dir / "train", tmp / "data", seed=0, per_class=24, copies=4, cross_class=1,
                    flip_fraction=0.08, outliers=1)  # fmt: skip
    dataset = load_dataset(str(planted.root), DataConfig(cache_dir=str(tmp / "cache")), progress=False)
    return planted, diagnose_dataset(dataset), str(dataset.cache_path)


@pytest.mark.needs_shared_data
def test_real_images_planted_copies_are_found(planted_set: tuple[Any, Any, str]) -> None:
    planted, found, _ = planted_set
    pairs = {frozenset(d.paths): d.kind for d in found.near_duplicates}
    assert all(frozenset(p) in pairs for p in planted.copies)
    cross = planted.copies[0]  # the first copy is filed under the other class
    assert pairs[frozenset(cross)] == "cross-class"


@pytest.mark.needs_shared_data
def test_real_images_flips_and_outlier_are_found(planted_set: tuple[Any, Any, str]) -> None:
    planted, found, _ = planted_set
    top = {i.path for i in found.label_issues[: 2 * len(planted.flipped)]}
    assert len(top & set(planted.flipped)) >= len(planted.flipped) - 1
    assert planted.outliers[0] in {o.path for o in found.outliers}
    assert {tuple(sorted(p.classes)) for p in found.confusable_pairs} <= {("ants", "bees")}


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("setting", ["drop-across-splits", "keep"])
def test_near_duplicate_setting_decides_whether_a_leaked_test_copy_stays(
    hymenoptera_dir: Path, tmp_path: Path, setting: str, caplog: pytest.LogCaptureFixture
) -> None:
    from PIL import Image

    from automl_tl.config import load_config
    from automl_tl.data import load_dataset
    from automl_tl.data.deep import leak_free_splits
    from tests.scenarios.planted import altered

    root = tmp_path / "data"
    for split, start, count in (("train", 0, 6), ("val", 6, 2), ("test", 8, 2)):
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True)
            for f in sorted((hymenoptera_dir / "train" / label).iterdir())[start : start + count]:
                (root / split / label / f.name).write_bytes(f.read_bytes())
    original = sorted((root / "train" / "ants").iterdir())[0]
    with Image.open(original) as img:
        altered(img, np.random.default_rng(0)).save(root / "test" / "ants" / "leaked.jpg")
    config = load_config({"data": {"source": str(root), "cache_dir": str(tmp_path / "cache"), "near_duplicates": setting}})
    dataset = load_dataset(str(root), config.data, progress=False)
    with caplog.at_level(logging.INFO, logger="automl_tl.data.deep"):
        _, val, test = leak_free_splits(dataset, config)
    said = [r.getMessage() for r in caplog.records if r.name == "automl_tl.data.deep"]
    test_paths = {str(dataset.paths[i]) for i in test}
    assert ("test/ants/leaked.jpg" in test_paths) == (setting == "keep")
    assert len(val) == 4 and len(test) == (5 if setting == "keep" else 4)
    if setting == "keep":
        assert said == []
    else:
        assert len(said) == 2 and "left out 1 val/test image(s)" in said[1] and "test 1)" in said[1]


@pytest.mark.needs_shared_data
def test_report_data_health_shows_each_finding_with_thumbnails(planted_set: tuple[Any, Any, str], tmp_path: Path) -> None:
    import re

    from automl_tl.data.deep import DIAGNOSTICS_NAME
    from automl_tl.report._health import data_health
    from automl_tl.report._inputs import RunInputs

    _, found, cache_path = planted_set
    run = RunInputs(path=tmp_path, summary={}, trials=[], curves={}, data={"cache_path": cache_path})
    assert "has no diagnostics.json" in data_health(run)
    (tmp_path / DIAGNOSTICS_NAME).write_text(json.dumps(found.to_dict()), encoding="utf-8")
    html = data_health(run)
    shown = min(12, len(found.label_issues)) + 2 * min(12, len(found.near_duplicates)) + min(12, len(found.outliers))
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == shown
    for heading in ("Likely label errors", "Near-duplicates", "Outliers", "Confusable class pairs"):
        assert f"<h3>{heading}" in html
