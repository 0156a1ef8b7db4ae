"""Every input format of automl_tl.data: manifests (CSV, Parquet), Parquet of image bytes, URIs (file://, and
s3:// against a local moto server when moto[server] is installed), and builtin:animal-shapes."""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from automl_tl.config import DataConfig, load_config
from automl_tl.data import load_dataset, resolve_source
from automl_tl.errors import DatasetError
from tests.scenarios._common import free_port as _free_port


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def config_for(tmp: Path, **changes: object) -> DataConfig:
    base: dict[str, object] = {"cache_dir": str(tmp / "cache"), "decode_workers": 2}
    base.update(changes)
    return load_config({"data": base}).data


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("path", "label", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)
    return path


def split_rows(n_per_class: int = 8) -> list[tuple[str, str]]:
    """(label, split) pairs: per class 6 train, 1 val, 1 test when n_per_class is 8."""
    out = []
    for label in ("cat", "dog"):
        for i in range(n_per_class):
            out.append((label, "test" if i == 0 else "val" if i == 1 else "train"))
    return out


def error_of(source: str | Path, tmp: Path, **changes: object) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(str(source), config_for(tmp, **changes), progress=False)
    return str(info.value)


# ---------------------------------------------------------------- CSV and Parquet manifests


def test_csv_manifest_relative_absolute_unicode_and_splits(tmp_path: Path) -> None:
    rows = []
    for i, (label, split) in enumerate(split_rows()):
        name = f"imgs/{label}, no. {i} été.jpg" if i % 3 else f"imgs/{label}_{i}.jpg"
        path = write(tmp_path / "m" / name, jpeg(i))
        rows.append([str(path) if i == 4 else name, f" {label} ", split.upper() if i == 5 else split])
    write(tmp_path / "outside" / "far.jpg", jpeg(100))
    rows.append(["../outside/far.jpg", "cat", "train"])  # a local manifest may reach outside its folder
    manifest = write_csv(tmp_path / "m" / "manifest.csv", rows)
    ds = load_dataset(str(manifest), config_for(tmp_path), progress=False)
    assert ds.report.kind == "csv-manifest" and ds.class_names == ("cat", "dog")
    assert ds.report.given_splits == ("train", "val", "test")
    assert ds.report.counts == {
        "train": {"cat": 7, "dog": 6}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}
    }
    assert "imgs/cat, no. 1 été.jpg" in set(ds.paths)


def test_csv_manifest_errors_name_the_column_or_row(tmp_path: Path) -> None:
    write(tmp_path / "a.jpg", jpeg(1))
    bad_header = write_csv(tmp_path / "no_label.csv", [["a.jpg", "x"]], header=("path", "klass"))
    message = error_of(bad_header, tmp_path)
    assert "missing column 'label'" in message and "path, klass" in message
    missing = write_csv(tmp_path / "missing.csv", [["a.jpg", "x", ""], ["gone.jpg", "y", ""]])
    message = error_of(missing, tmp_path)
    assert "missing.csv line 3" in message and "file not found: gone.jpg" in message
    split = write_csv(tmp_path / "split.csv", [["a.jpg", "x", "train"], ["a.jpg", "y", "holdout"]])
    message = error_of(split, tmp_path)
    assert "split.csv line 3" in message and "unknown split name 'holdout'" in message
    unlabelled = write_csv(tmp_path / "unlabelled.csv", [["a.jpg", " ", ""]])
    assert "unlabelled.csv line 2: empty label" in error_of(unlabelled, tmp_path)


def test_duplicate_across_given_splits_keeps_the_evaluation_copy(tmp_path: Path) -> None:
    rows = [[f"{label}_{i}.jpg", label, split] for i, (label, split) in enumerate(split_rows())]
    for i, (label, _) in enumerate(split_rows()):
        write(tmp_path / f"{label}_{i}.jpg", jpeg(i))
    write(tmp_path / "copy.jpg", jpeg(1))  # the same bytes as cat_1.jpg, which is in val
    rows.append(["copy.jpg", "cat", "train"])
    ds = load_dataset(str(write_csv(tmp_path / "m.csv", rows)), config_for(tmp_path), progress=False)
    (group,) = ds.report.duplicates
    assert group.paths == ("cat_1.jpg", "copy.jpg") and group.kept == ("cat_1.jpg",)


def test_parquet_manifest(tmp_path: Path) -> None:
    pairs = split_rows()
    for i in range(len(pairs)):
        write(tmp_path / "img" / f"{i}.jpg", jpeg(i))
    table = pa.table({"path": [f"img/{i}.jpg" for i in range(len(pairs))], "label": [p[0] for p in pairs]})
    pq.write_table(table, tmp_path / "manifest.parquet")
    ds = load_dataset(str(tmp_path / "manifest.parquet"), config_for(tmp_path), progress=False)
    assert ds.report.kind == "parquet-manifest" and len(ds) == 16 and ds.report.drawn_splits == ("val", "test")
    pq.write_table(pa.table({"path": ["img/0.jpg", "img/1.jpg", "nope.jpg"], "label": ["a", "b", "a"]}),
                   tmp_path / "broken.parquet")
    assert "broken.parquet row 2: file not found: nope.jpg" in error_of(tmp_path / "broken.parquet", tmp_path)
    pq.write_table(pa.table({"file": ["x"], "label": ["a"]}), tmp_path / "neither.parquet")
    message = error_of(tmp_path / "neither.parquet", tmp_path)
    assert "missing column 'path'" in message and "'image'" in message and "file, label" in message


def test_parquet_of_image_bytes(tmp_path: Path) -> None:
    pairs = split_rows()
    images = [jpeg(i) for i in range(len(pairs))]
    images[3] = b"\xff\xd8\xff garbage"  # a broken image inside the file: skipped, reported by row
    labels = [0 if p[0] == "cat" else 1 for p in pairs]  # integer labels, as in exported data sets
    pq.write_table(pa.table({"image": images, "label": labels, "split": [p[1] for p in pairs]}),
                   tmp_path / "images.parquet", row_group_size=5)
    ds = load_dataset(str(tmp_path / "images.parquet"), config_for(tmp_path), progress=False)
    assert ds.report.kind == "parquet-images" and ds.class_names == ("0", "1")
    assert ds.report.skip_reason("images.parquet row 3") == "not-an-image"
    assert len(ds) == 15 and ds.image(0).shape == (32, 40, 3)
    # The layout of Hugging Face exports: image is a struct of bytes and path.
    struct = pa.array([{"bytes": b, "path": None} for b in images[4:]],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "label": [str(x) for x in labels[4:]]}), tmp_path / "hf.parquet")
    hf = load_dataset(str(tmp_path / "hf.parquet"), config_for(tmp_path, val_fraction=0.2, test_fraction=0.2),
                      progress=False)
    assert len(hf) == 12 and not hf.report.skipped


# ---------------------------------------------------------------- URIs through pyarrow filesystems


def test_file_uri_follows_the_remote_rules(tmp_path: Path) -> None:
    for i, (label, _) in enumerate(split_rows()):
        write(tmp_path / "data" / label / f"{i}.jpg", jpeg(i))
    ds = load_dataset(tmp_path.joinpath("data").as_uri(), config_for(tmp_path), progress=False)
    assert len(ds) == 16 and ds.report.kind == "class-folders"
    write(tmp_path / "secret.jpg", jpeg(99))
    rows = [[f"{label}/{i}.jpg", label, ""] for i, (label, _) in enumerate(split_rows())]
    manifest = write_csv(tmp_path / "data" / "m.csv", rows + [["../secret.jpg", "cat", ""]])
    message = error_of(manifest.as_uri(), tmp_path)
    assert "m.csv line 18" in message and "escapes the manifest's folder" in message
    absolute = write_csv(tmp_path / "data" / "abs.csv", rows + [[str(tmp_path / "secret.jpg"), "cat", ""]])
    assert "absolute path" in error_of(absolute.as_uri(), tmp_path)
    ok = write_csv(tmp_path / "data" / "ok.csv", rows)
    assert len(load_dataset(ok.as_uri(), config_for(tmp_path), progress=False)) == 16


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, started and stopped by this fixture (by its process handle)."""
    pytest.importorskip("moto", reason="s3:// is tested against moto[server]; pip install 'moto[server]'")
    port = _free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("the moto server did not start")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_folder_and_manifest(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyarrow import fs as pafs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3 = pafs.S3FileSystem(endpoint_override=moto_endpoint, scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    s3.create_dir("bucket")
    rows = []
    for i, (label, split) in enumerate(split_rows()):
        with s3.open_output_stream(f"bucket/data/{split}/{label}/img {i}.jpg") as fh:
            fh.write(jpeg(i))
        rows.append([f"{split}/{label}/img {i}.jpg", label, split])
    with s3.open_output_stream("bucket/data/.DS_Store") as fh:
        fh.write(b"x")
    buf = io.StringIO()
    csv.writer(buf).writerows([["path", "label", "split"], *rows, ["../elsewhere.jpg", "cat", ""]])
    with s3.open_output_stream("bucket/data/escape.csv") as fh:
        fh.write(buf.getvalue().encode())
    query = f"?endpoint_override={moto_endpoint}&scheme=http&region=us-east-1"
    ds = load_dataset(f"s3://bucket/data{query}", config_for(tmp_path), progress=False)
    assert ds.report.kind == "split-folders" and len(ds) == 16 and ds.report.ignored_files == 2  # .DS_Store, escape.csv
    assert ds.report.counts["val"] == {"cat": 1, "dog": 1}
    again = load_dataset(f"s3://bucket/data{query}", config_for(tmp_path), progress=False)
    assert again.report.cache_hit
    assert "escapes the manifest's folder" in error_of(f"s3://bucket/data/escape.csv{query}", tmp_path)


# ---------------------------------------------------------------- the built-in default


def test_builtin_animal_shapes_offline(tmp_path: Path) -> None:
    ds = load_dataset("builtin:animal-shapes", config_for(tmp_path), progress=False)
    assert ds.class_names == ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
    assert ds.report.files_seen == 10_000 and not ds.report.skipped
    assert ds.report.images == 10_000 - ds.report.duplicates_dropped == len(ds)
    assert not ds.report.label_conflicts and ds.report.modes == {"L": len(ds)}
    img = ds.image(0)
    assert img.shape == (28, 28, 3) and (img[..., 0] == img[..., 2]).all()
    assert all(n > 0 for split in ("train", "val", "test") for n in ds.report.counts[split].values())


def test_builtin_loader_refuses_pickles_that_are_not_arrays(tmp_path: Path) -> None:
    from automl_tl.data._builtin import _load_array

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump(OrderedDict(a=1), fh)
    with pytest.raises(DatasetError, match="refusing to load collections.OrderedDict"):
        _load_array(path)


def test_resolve_source_lists_without_decoding(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a" / "x.jpg", b"not even an image")
    write(tmp_path / "d" / "b" / "y.jpg", jpeg(1))
    source = resolve_source(str(tmp_path / "d"))
    assert [r.path for r in source.records] == ["a/x.jpg", "b/y.jpg"] and source.classes == ("a", "b")
