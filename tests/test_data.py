"""automl_tl.data on real images: a bad-input corpus built in a temp folder, and the shared data sets.

Every case of issue 3 (items 2 and 3) is a real file here, asserted by name in the report or by the words of
its error. Run: .venv/bin/python -m pytest tests/test_data*.py -q
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from automl_tl.config import DataConfig, load_config
from automl_tl.data import Dataset, format_report, load_dataset
from automl_tl.errors import DatasetError

PIXEL_LIMIT = 100_000  # the corpus' oversized image has 160,000 pixels; every other one far fewer


# ---------------------------------------------------------------- image builders (real encoded files)


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/img_i.jpg, every image distinct."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            write(root / name / f"img_{i:03d}.jpg", encode(noise(seed * 100_000 + c * 1000 + i), "JPEG", quality=90))
    return root


def config_for(tmp: Path, **changes: object) -> DataConfig:
    base: dict[str, object] = {"cache_dir": str(tmp / "cache"), "decode_workers": 2}
    base.update(changes)
    return load_config({"data": base}).data


# ---------------------------------------------------------------- the bad-input corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "my data"
    make_class_folders(root, {"cats": 20, "dogs": 20})
    cats, dogs = root / "cats", root / "dogs"
    good = encode(noise(7), "JPEG", quality=90)
    # Modes: each decodes to RGB.
    write(cats / "mode_L.png", encode(Image.new("L", (30, 20), 90), "PNG"))
    write(cats / "mode_LA.png", encode(Image.new("LA", (30, 20), (90, 0)), "PNG"))
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    write(cats / "mode_P.png", encode(pal, "PNG"))
    write(cats / "mode_P_transparent.png", encode(pal, "PNG", transparency=1))
    write(cats / "mode_RGBA.png", encode(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), "PNG"))
    write(cats / "mode_CMYK.jpg", encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"))
    write(cats / "mode_I16.png", encode(Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16)), "PNG"))
    checker = Image.fromarray((np.indices((20, 30)).sum(axis=0) % 2).astype(bool))
    write(cats / "mode_1.png", encode(checker, "PNG"))
    frames = [Image.new("RGB", (30, 20), (250, 0, 0)), Image.new("RGB", (30, 20), (0, 250, 0))]
    write(cats / "animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100))
    sideways = Image.new("RGB", (40, 20), (0, 0, 255))
    sideways.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    write(cats / "exif_rotated.jpg", encode(sideways, "JPEG", exif=exif.tobytes(), quality=95))
    write(cats / "été photo – n°1 😺.jpg", encode(noise(11), "JPEG"))
    write(dogs / "sub folder" / "nested dog.png", encode(noise(12), "PNG"))
    # Bad files: each skipped with its reason.
    write(cats / "zero.jpg", b"")
    write(cats / "notes.jpg", b"this is a text file, not a JPEG\n")
    write(cats / "truncated.jpg", good[: len(good) // 2])
    png = bytearray(encode(noise(13), "PNG"))
    png[80:140] = bytes(60)
    write(cats / "corrupt.png", bytes(png))
    write(dogs / "huge.png", encode(Image.new("RGB", (400, 400), (9, 9, 9)), "PNG"))
    # Duplicates: twice in one class; once in each class (a label conflict).
    twin = encode(noise(14), "JPEG")
    write(dogs / "twin_a.jpg", twin)
    write(dogs / "twin_b.jpg", twin)
    clash = encode(noise(15), "JPEG")
    write(cats / "clash.jpg", clash)
    write(dogs / "clash.jpg", clash)
    # Litter and hidden files: ignored quietly; an image outside any class folder: reported.
    write(root / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(cats / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(dogs / "Thumbs.db", b"\xd0\xcf\x11\xe0")
    write(cats / "._resource_fork.jpg", b"\x00\x05\x16\x07")
    write(cats / ".hidden.jpg", encode(noise(16), "JPEG"))
    write(root / ".git" / "objects" / "x.jpg", encode(noise(17), "JPEG"))
    write(root / "__MACOSX" / "cats" / "._img.jpg", b"\x00\x05\x16\x07")
    write(root / "README.txt", b"about this data\n")
    write(root / "stray.jpg", encode(noise(18), "JPEG"))
    return root


@pytest.fixture(scope="module")
def corpus_ds(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    config = config_for(tmp_path_factory.mktemp("c"), max_image_pixels=PIXEL_LIMIT)
    return load_dataset(str(corpus), config, progress=False)


def _image(ds: Dataset, path: str) -> np.ndarray:
    return ds.image(int(np.flatnonzero(ds.paths == path)[0]))


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("cats/zero.jpg", "empty-file"),
        ("cats/notes.jpg", "not-an-image"),
        ("cats/truncated.jpg", "truncated"),
        ("cats/corrupt.png", "corrupt"),
        ("dogs/huge.png", "oversized"),
        ("stray.jpg", "outside-class-folder"),
    ],
)
def test_each_bad_file_is_skipped_with_its_reason(corpus_ds: Dataset, path: str, reason: str) -> None:
    assert corpus_ds.report.skip_reason(path) == reason
    assert path not in set(corpus_ds.paths)


def test_skip_details_name_the_problem(corpus_ds: Dataset) -> None:
    detail = {s.path: s.detail for s in corpus_ds.report.skipped}
    assert "400x400" in detail["dogs/huge.png"] and f"{PIXEL_LIMIT:,}" in detail["dogs/huge.png"]
    assert "0 bytes" in detail["cats/zero.jpg"]
    assert len(corpus_ds.report.skipped) == 6  # nothing else was skipped


def test_litter_and_hidden_files_are_ignored_quietly(corpus_ds: Dataset) -> None:
    listed = {s.path for s in corpus_ds.report.skipped} | set(corpus_ds.paths)
    assert not any(part.startswith(".") or part in ("Thumbs.db", "__MACOSX") for p in listed for part in p.split("/"))
    # .DS_Store x2, Thumbs.db, ._resource_fork.jpg, .hidden.jpg, .git/objects/x.jpg, __MACOSX/.., README.txt
    assert corpus_ds.report.ignored_files == 8


def test_every_mode_becomes_rgb(corpus_ds: Dataset) -> None:
    for name in ("L", "LA", "P", "P_transparent", "RGBA", "CMYK", "I16", "1"):
        img = _image(corpus_ds, f"cats/mode_{name}.png" if name != "CMYK" else "cats/mode_CMYK.jpg")
        assert img.dtype == np.uint8 and img.shape == (20, 30, 3), name
    assert set(corpus_ds.report.modes) >= {"RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1"}
    assert _image(corpus_ds, "cats/mode_I16.png").max() == 128  # 16-bit scaled, not clipped to 255
    assert (_image(corpus_ds, "cats/mode_RGBA.png") == 255).all()  # transparent -> white
    assert (_image(corpus_ds, "cats/mode_P_transparent.png") == 255).all()
    assert tuple(_image(corpus_ds, "cats/mode_P.png")[0, 0]) == (200, 10, 10)
    assert set(np.unique(_image(corpus_ds, "cats/mode_1.png")).tolist()) == {0, 255}
    assert tuple(_image(corpus_ds, "cats/mode_CMYK.jpg")[10, 15]) == pytest.approx((255, 0, 0), abs=3)


def test_animated_gif_gives_its_first_frame(corpus_ds: Dataset) -> None:
    img = _image(corpus_ds, "cats/animated.gif")
    assert img[..., 0].mean() > 200 and img[..., 1].mean() < 30


def test_exif_orientation_is_applied(corpus_ds: Dataset) -> None:
    img = _image(corpus_ds, "cats/exif_rotated.jpg").astype(int)
    assert img.shape == (40, 20, 3)  # portrait once rotated
    top, bottom = img[:18].mean(axis=(0, 1)), img[22:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_unicode_spaces_and_nested_folders(corpus_ds: Dataset) -> None:
    assert "cats/été photo – n°1 😺.jpg" in set(corpus_ds.paths)
    assert "dogs/sub folder/nested dog.png" in set(corpus_ds.paths)
    assert "my data" in corpus_ds.report.source


def test_duplicates_and_label_conflicts(corpus_ds: Dataset) -> None:
    report = corpus_ds.report
    by_paths = {g.paths: g for g in report.duplicates}
    twins = by_paths[("dogs/twin_a.jpg", "dogs/twin_b.jpg")]
    assert not twins.conflict and twins.kept == ("dogs/twin_a.jpg",)
    clash = by_paths[("cats/clash.jpg", "dogs/clash.jpg")]
    assert clash.conflict and clash.labels == ("cats", "dogs") and clash.kept == ()
    assert report.label_conflicts == (clash,)
    assert report.duplicates_dropped == 3
    paths = set(corpus_ds.paths)
    assert "dogs/twin_a.jpg" in paths and "dogs/twin_b.jpg" not in paths
    assert not {"cats/clash.jpg", "dogs/clash.jpg"} & paths
    assert len(set(corpus_ds.ids)) == len(corpus_ds)


def test_report_counts_and_text(corpus_ds: Dataset) -> None:
    report = corpus_ds.report
    assert report.class_names == ("cats", "dogs")
    total = sum(sum(c.values()) for c in report.counts.values())
    assert total == report.images == len(corpus_ds)
    # 40 noise + 8 modes + animation + exif + unicode + nested + twins + clash pair + 5 bad, + the stray
    assert report.files_seen == 40 + 8 + 1 + 1 + 1 + 1 + 2 + 2 + 5 + 1
    text = format_report(report)
    for needle in ("cats/truncated.jpg: truncated", "stray.jpg: outside-class-folder", "label conflicts (1",
                   "dogs/twin_a.jpg, dogs/twin_b.jpg", "train", "val", "test"):
        assert needle in text
    plain = report.to_dict()
    json.dumps(plain)
    assert plain["skipped_by_reason"]["oversized"] == 1 and plain["label_conflicts"] == 1


def test_keep_duplicates_when_asked(corpus: Path, tmp_path: Path) -> None:
    ds = load_dataset(str(corpus), config_for(tmp_path, max_image_pixels=PIXEL_LIMIT, drop_duplicates=False),
                      progress=False)
    assert {"dogs/twin_b.jpg", "cats/clash.jpg", "dogs/clash.jpg"} <= set(ds.paths)
    assert ds.report.duplicates_dropped == 0


# ---------------------------------------------------------------- errors that stop early


def _error(source: str | Path, tmp: Path, **changes: object) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(str(source), config_for(tmp, **changes), progress=False)
    return str(info.value)


def test_error_no_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no images found" in _error(tmp_path / "empty", tmp_path)
    write(tmp_path / "litter" / ".DS_Store", b"x")
    write(tmp_path / "litter" / "a" / "Thumbs.db", b"x")
    assert "no images found" in _error(tmp_path / "litter", tmp_path)


def test_error_single_class(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "one", {"only": 6})
    message = _error(tmp_path / "one", tmp_path)
    assert "single class" in message and "'only'" in message


def test_error_class_too_small_names_it_and_its_count(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "small", {"big": 12, "tiny": 2})
    message = _error(tmp_path / "small", tmp_path)
    assert "class 'tiny' has 2 image(s)" in message and "at least 3" in message
    (tmp_path / "small" / "hollow").mkdir()  # an empty class folder counts as a class with 0 images
    assert "class 'hollow' has no usable image" in _error(tmp_path / "small", tmp_path)


def test_error_unknown_split_folder(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "s" / "train", {"a": 5, "b": 5})
    make_class_folders(tmp_path / "s" / "holdout", {"a": 2, "b": 2}, seed=1)
    message = _error(tmp_path / "s", tmp_path)
    assert "'holdout'" in message and "unknown split name" in message


def test_error_given_split_missing_a_class(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "s" / "train", {"a": 5, "b": 5})
    make_class_folders(tmp_path / "s" / "val", {"a": 2}, seed=1)
    (tmp_path / "s" / "val" / "b").mkdir()
    assert "class 'b' has no images in the val split" in _error(tmp_path / "s", tmp_path)


def test_error_too_many_unreadable_files(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "d", {"a": 6, "b": 6})
    for i in range(4):
        write(tmp_path / "d" / "a" / f"broken_{i}.jpg", b"not an image")
    message = _error(tmp_path / "d", tmp_path, max_unreadable_fraction=0.1)
    assert "4 of 16 files" in message and "max_unreadable_fraction=0.1" in message
    assert "not-an-image" in message
    # Under the limit, the same files are only reported.
    ds = load_dataset(str(tmp_path / "d"), config_for(tmp_path, max_unreadable_fraction=0.3), progress=False)
    assert ds.report.skipped_by_reason == {"not-an-image": 4} and ds.report.cache_hit


def test_error_all_unreadable(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(3):
            write(tmp_path / "d" / c / f"{i}.jpg", b"")
    assert "none of the 6 files" in _error(tmp_path / "d", tmp_path, max_unreadable_fraction=1.0)


def test_error_missing_source_and_unknown_files(tmp_path: Path) -> None:
    assert "data not found" in _error(tmp_path / "nope", tmp_path)
    write(tmp_path / "data.txt", b"hello")
    assert "cannot read" in _error(tmp_path / "data.txt", tmp_path)
    assert "unknown built-in data set 'nope'" in _error("builtin:nope", tmp_path)


# ---------------------------------------------------------------- splits


def test_split_is_stratified_seeded_and_independent_of_listing_order(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "a", {"x": 40, "y": 20})
    cfg = config_for(tmp_path)
    first = load_dataset(str(tmp_path / "a"), cfg, progress=False)
    counts = first.report.counts
    assert (counts["train"]["x"], counts["val"]["x"], counts["test"]["x"]) == (28, 6, 6)
    assert (counts["train"]["y"], counts["val"]["y"], counts["test"]["y"]) == (14, 3, 3)
    assert first.report.drawn_splits == ("val", "test")
    # Same images under other names, in another folder (another listing order): the same split per image.
    for path in (tmp_path / "a").rglob("*.jpg"):
        write(tmp_path / "b" / path.parent.name / f"renamed_{999 - int(path.stem[4:]):03d}.jpg", path.read_bytes())
    second = load_dataset(str(tmp_path / "b"), cfg, progress=False)
    assert dict(zip(first.ids, first.splits)) == dict(zip(second.ids, second.splits))
    # Another seed: another split, from the same cache file (no decoding).
    other = load_dataset(str(tmp_path / "a"), config_for(tmp_path, seed=1), progress=False)
    assert other.report.cache_hit and other.cache_path == first.cache_path
    assert not np.array_equal(other.splits, first.splits)
    assert dict(zip(first.ids, first.splits)) == dict(zip(Dataset.open(first.cache_path, cfg).ids,
                                                          Dataset.open(first.cache_path, cfg).splits))


def test_given_train_only_draws_val_and_leaves_test_empty(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "d" / "train", {"a": 10, "b": 10})
    ds = load_dataset(str(tmp_path / "d"), config_for(tmp_path), progress=False)
    assert ds.report.given_splits == ("train",) and ds.report.drawn_splits == ("val",)
    assert ds.indices("test").size == 0
    assert ds.report.counts["val"] == {"a": 2, "b": 2}


def test_separate_test_source(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "main", {"a": 10, "b": 10})
    make_class_folders(tmp_path / "extra", {"a": 3, "b": 4}, seed=5)
    ds = load_dataset(str(tmp_path / "main"), config_for(tmp_path), progress=False,
                      test_source=str(tmp_path / "extra"))
    assert ds.report.counts["test"] == {"a": 3, "b": 4}
    assert ds.report.test_source == str(tmp_path / "extra")
    assert ds.report.counts["val"] == {"a": 2, "b": 2} and sum(ds.report.counts["train"].values()) == 16
    reopened = Dataset.open(ds.cache_path, config_for(tmp_path))
    assert np.array_equal(reopened.splits, ds.splits)
    make_class_folders(tmp_path / "odd", {"a": 3, "c": 3}, seed=6)
    message = _error(tmp_path / "main", tmp_path, test_source=str(tmp_path / "odd"))
    assert "'c'" in message and "'b'" in message and "does not match the classes" in message


# ---------------------------------------------------------------- cache, reopening, streaming


def test_cache_is_reused_reopened_and_invalidated(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"a": 8, "b": 8})
    cfg = config_for(tmp_path)
    first = load_dataset(str(root), cfg, progress=False)
    again = load_dataset(str(root), cfg, progress=False)
    assert not first.report.cache_hit and again.report.cache_hit and again.cache_path == first.cache_path
    assert first.cache_path.parent == tmp_path / "cache" and first.cache_path.suffix == ".arrow"
    reopened = Dataset.open(first.cache_path, cfg)
    clone = pickle.loads(pickle.dumps(first))
    for other in (reopened, clone):
        assert other.class_names == first.class_names
        assert np.array_equal(other.labels, first.labels) and np.array_equal(other.splits, first.splits)
        assert np.array_equal(other.image(3), first.image(3))
    write(root / "a" / "img_000.jpg", encode(noise(12345), "JPEG"))  # content changed: decode again
    changed = load_dataset(str(root), cfg, progress=False)
    assert not changed.report.cache_hit and changed.cache_path != first.cache_path


def test_a_damaged_cache_file_is_rebuilt(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"a": 8, "b": 8})
    cfg = config_for(tmp_path)
    path = load_dataset(str(root), cfg, progress=False).cache_path
    path.write_bytes(path.read_bytes()[:1000])  # e.g. a disk that filled up
    with pytest.raises(DatasetError, match="cannot open the data cache"):
        Dataset.open(path, cfg)
    rebuilt = load_dataset(str(root), cfg, progress=False)
    assert not rebuilt.report.cache_hit and rebuilt.cache_path == path and len(rebuilt) == 16


def test_images_are_resized_views_of_the_mapped_file(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a" / "wide.png", encode(noise(1, (200, 50)), "PNG"))
    write(tmp_path / "d" / "b" / "tall.jpg", encode(noise(2, (30, 90)), "JPEG"))
    make_class_folders(tmp_path / "d", {"a": 3, "b": 3}, seed=9)
    ds = load_dataset(str(tmp_path / "d"), config_for(tmp_path, cache_max_side=64), progress=False)
    wide = _image(ds, "a/wide.png")
    assert wide.shape == (16, 64, 3) and wide.dtype == np.uint8 and not wide.flags.writeable
    assert _image(ds, "b/tall.jpg").shape == (64, 21, 3)
    assert ds.report.sizes.max_cached_side == 64 and ds.report.sizes.max_width == 200


def test_iter_batches_streams_without_loading_the_file(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"a": 30, "b": 30})
    load_dataset(str(root), config_for(tmp_path), progress=False)
    before = pa.total_allocated_bytes()
    ds = load_dataset(str(root), config_for(tmp_path), progress=False)  # maps the file, copies no pixels
    seen: list[int] = []
    for batch in ds.iter_batches("train", 8):
        assert len(batch.images) == batch.labels.size == batch.indices.size <= 8
        assert all(not img.flags.owndata for img in batch.images)  # views into the memory map
        np.testing.assert_array_equal(batch.images[0], ds.image(int(batch.indices[0])))
        seen += batch.indices.tolist()
    assert pa.total_allocated_bytes() - before < 1_000_000
    assert seen == ds.indices("train").tolist()
    shuffled = [i for b in ds.iter_batches("train", 8, shuffle_seed=3, drop_last=True) for i in b.indices.tolist()]
    assert len(shuffled) == len(seen) // 8 * 8 and shuffled != seen[: len(shuffled)]
    assert shuffled == [i for b in ds.iter_batches("train", 8, shuffle_seed=3, drop_last=True)
                        for i in b.indices.tolist()]
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        ds.indices("dev")


# ---------------------------------------------------------------- the shared real data sets


@pytest.mark.needs_shared_data
def test_hymenoptera_keeps_its_given_split(hymenoptera_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(str(hymenoptera_dir), config_for(tmp_path), progress=False)
    assert len(ds) == 397 and ds.class_names == ("ants", "bees")
    assert ds.report.kind == "split-folders" and ds.report.given_splits == ("train", "val")
    assert ds.report.counts == {"train": {"ants": 123, "bees": 121}, "val": {"ants": 70, "bees": 83},
                                "test": {"ants": 0, "bees": 0}}
    assert not ds.report.skipped and max(ds.image(0).shape[:2]) <= 320


@pytest.fixture(scope="module")
def flowers5(flowers5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset(str(flowers5_dir), config_for(tmp_path_factory.mktemp("f5")), progress=False)


@pytest.mark.needs_shared_data
def test_flowers5_reports_duplicates_and_conflicts(flowers5: Dataset) -> None:
    report = flowers5.report
    assert report.files_seen == 4317 and not report.skipped
    assert len(report.duplicates) == 6 and len(report.label_conflicts) == 4
    assert all(set(g.labels) == {"rose", "tulip"} for g in report.label_conflicts)
    assert report.images == 4317 - 2 - 8 == len(flowers5)
    assert flowers5.image(0).shape == (128, 128, 3)


@pytest.mark.needs_shared_data
def test_flowers5_reload_hits_the_cache(flowers5: Dataset, flowers5_dir: Path) -> None:
    again = load_dataset(str(flowers5_dir), flowers5.config, progress=False)
    assert again.report.cache_hit and again.cache_path == flowers5.cache_path
    assert np.array_equal(again.splits, flowers5.splits)


# ---------------------------------------------------------------- the CLI


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "automl-tl"
    env = dict(os.environ, AUTOML_TL_CACHE_DIR=str(cache))
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_inspect_prints_and_writes_the_report(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = _cli("inspect", str(corpus), "--json", str(out), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "cats/notes.jpg: not-an-image" in done.stdout and "label conflicts" in done.stdout
    assert "validating images" in done.stderr  # progress goes to stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["class_names"] == ["cats", "dogs"] and report["label_conflicts"] == 1
    assert {s["path"]: s["reason"] for s in report["skipped"]}["cats/truncated.jpg"] == "truncated"
    quiet = _cli("inspect", str(corpus), "--quiet", cache=tmp_path / "cache")
    assert quiet.returncode == 0 and quiet.stderr == "" and "(reused)" in quiet.stdout


def test_cli_progress_rewrites_one_line_on_a_terminal(corpus: Path, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    exe = Path(sys.executable).parent / "automl-tl"
    env = dict(os.environ, AUTOML_TL_CACHE_DIR=str(tmp_path / "cache"))
    with subprocess.Popen([str(exe), "inspect", str(corpus)], stdout=subprocess.DEVNULL, stderr=follower,
                          env=env) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed when the command exited
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0
    os.close(leader)
    shown = b"".join(chunks).decode()
    assert "\r" in shown and "validating images" in shown and "done in" in shown
    assert "%|" in shown  # a bar was drawn (tqdm's)
    assert shown.count("\n") <= 2  # one line, rewritten in place


def test_cli_folder_without_images_exits_2_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    done = _cli("inspect", str(folder), cache=tmp_path / "cache")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("automl-tl: error: ") and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("counts", "empty_class", "problem"),
    [
        ({"lonely": 4}, None, "single class ('lonely')"),
        ({"a": 6, "b": 6}, "hollow", "class 'hollow' has no usable image"),
        ({"a": 6, "tiny": 2}, None, "class 'tiny' has 2 image(s)"),
    ],
    ids=["single-class", "empty-class-folder", "class-too-small"],
)
def test_cli_inspect_reports_what_search_refuses(
    tmp_path: Path, counts: dict[str, int], empty_class: str | None, problem: str
) -> None:
    folder = make_class_folders(tmp_path / "data", counts)
    if empty_class:
        (folder / empty_class).mkdir()
    out = tmp_path / "report.json"
    done = _cli("inspect", str(folder), "--quiet", "--json", str(out), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "problems (1;" in done.stdout and problem in done.stdout
    assert [problem in p for p in json.loads(out.read_text(encoding="utf-8"))["problems"]] == [True]
    assert problem in _error(folder, tmp_path)  # what a search loads: refused, naming the class

