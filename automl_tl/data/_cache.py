"""The decode-once cache: one uncompressed Arrow IPC file per data set, memory-mapped by every reader.

Layout of ``<cache_dir>``::

    <key>.arrow          every record, one row each: id (sha256 of the file), path, label, given split,
                         status/detail, original size and mode, and the RGB pixels (null when skipped)
    index/<fingerprint>  the key of the file a listing (paths, sizes, mtimes, labels) last produced

``key`` hashes the sorted (content hash, label, given split) records with the class names, the format
version, the maximum side and the pixel limit, so the same images under the same labels share one file. A
re-run whose listing is unchanged finds its key through the fingerprint without reading a single image
(like make and git, a file rewritten with the same size and modification time goes unnoticed). The random
split is *not* part of the file: it is drawn at load time from ids and seed, so a new seed decodes nothing.
Old files are never evicted; delete the folder to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from automl_tl.config import DataConfig
from automl_tl.data._decode import Decoded
from automl_tl.errors import DatasetError

FORMAT_VERSION = 1
CACHE_ENV = "AUTOML_TL_CACHE_DIR"
_META_FORMAT = b"automl_tl.format"
_META_CLASSES = b"automl_tl.class_names"
_META_MAX_SIDE = b"automl_tl.max_side"
_META_SOURCE = b"automl_tl.source"
_BATCH_ROWS = 256
_BATCH_BYTES = 64 * 1024 * 1024

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("label", pa.int32()),
        ("split_given", pa.string()),
        ("status", pa.string()),
        ("detail", pa.string()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_mode", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.binary()),
    ]
)


def cache_dir(config: DataConfig) -> Path:
    """``data.cache_dir``, else ``$AUTOML_TL_CACHE_DIR``, else ``~/.cache/automl_tl/datasets``."""
    raw = config.cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/automl_tl/datasets"
    path = Path(raw).expanduser()
    try:
        (path / "index").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create the data cache folder {path}: {exc}; set data.cache_dir or ${CACHE_ENV}"
        ) from None
    return path


def fingerprint(identities: Sequence[str], config: DataConfig) -> str:
    parts = [f"v{FORMAT_VERSION}", f"side={config.cache_max_side}", f"pixels={config.max_image_pixels}", *identities]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def lookup(folder: Path, fp: str) -> Path | None:
    """The cache file a previous run with this fingerprint wrote, if it is still there."""
    try:
        key = (folder / "index" / fp).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    path = folder / f"{key}.arrow"
    return path if key and path.is_file() else None


def remember(folder: Path, fp: str, path: Path) -> None:
    _write_atomic(folder / "index" / fp, path.stem.encode("ascii"))


class CacheWriter:
    """Streams decoded records into a temporary Arrow file; :meth:`finish` names it by its content key."""

    def __init__(self, folder: Path, class_names: Sequence[str], config: DataConfig, source: Mapping[str, Any]) -> None:
        self._folder = folder
        self._config = config
        self._class_index = {name: i for i, name in enumerate(class_names)}
        self._tmp = folder / f".{uuid.uuid4().hex}.arrow.tmp"
        meta = {
            _META_FORMAT: str(FORMAT_VERSION).encode(),
            _META_CLASSES: json.dumps(list(class_names)).encode(),
            _META_MAX_SIDE: str(config.cache_max_side).encode(),
            _META_SOURCE: json.dumps(dict(source)).encode(),
        }
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA.with_metadata(meta))
        self._rows: dict[str, list[object]] = {name: [] for name in SCHEMA.names}
        self._pending_bytes = 0
        self._key_lines: list[str] = []

    def add(self, path: str, label: str, split: str, item: Decoded) -> None:
        values = (
            item.id, path, self._class_index[label], split, item.status, item.detail, item.orig_width,
            item.orig_height, item.orig_mode, item.width, item.height, item.pixels,
        )
        for name, value in zip(SCHEMA.names, values):
            self._rows[name].append(value)
        self._key_lines.append(f"{item.id or 'unreadable:' + path}\t{label}\t{split}")
        self._pending_bytes += len(item.pixels or b"")
        if len(self._rows["id"]) >= _BATCH_ROWS or self._pending_bytes >= _BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._rows["id"]:
            return
        arrays = [_column(self._rows[f.name], f.type) for f in SCHEMA]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=SCHEMA))
        self._rows = {name: [] for name in SCHEMA.names}
        self._pending_bytes = 0

    def finish(self, tag: str = "") -> Path:
        """Close the file and move it to ``<key>.arrow`` (atomic; an identical file may already be there).

        ``tag`` (the shards' location, for a stream-mode index) is part of the key."""
        self._flush()
        self._writer.close()
        self._sink.close()
        config, classes = self._config, "\t".join(self._class_index)
        digest = hashlib.sha256(
            f"v{FORMAT_VERSION}\nside={config.cache_max_side}\npixels={config.max_image_pixels}\n{classes}\n".encode()
        )
        if tag:
            digest.update(f"tag={tag}\n".encode())
        for line in sorted(self._key_lines):
            digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
        final = self._folder / f"{digest.hexdigest()[:40]}.arrow"
        os.replace(self._tmp, final)
        return final

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except (OSError, pa.ArrowException):
            pass
        self._tmp.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class CacheFile:
    """An open cache file: the table (zero-copy views into the map), its class names and what it came from."""

    path: Path
    table: pa.Table
    class_names: tuple[str, ...]
    source: Mapping[str, Any]
    mapping: pa.MemoryMappedFile


def _column(values: list[Any], kind: pa.DataType) -> pa.Array:
    """An Arrow array assembled from buffers. Not pa.array(): it imports pandas on first use (a third of a
    second per process) and copies large bytes values one at a time, where one join suffices."""
    count = len(values)
    if kind == pa.int32():
        return pa.Array.from_buffers(kind, count, [None, pa.py_buffer(np.asarray(values, dtype=np.int32))])
    raw = [v.encode("utf-8", "backslashreplace") if isinstance(v, str) else v for v in values]
    lengths = np.fromiter((len(v) if v is not None else 0 for v in raw), dtype=np.int64, count=count)
    offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    valid = np.fromiter((v is not None for v in raw), dtype=bool, count=count)
    nulls = count - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    data = pa.py_buffer(b"".join(v for v in raw if v is not None))
    return pa.Array.from_buffers(kind, count, [validity, pa.py_buffer(offsets), data], null_count=nulls)


def open_cache(path: Path) -> CacheFile:
    """Memory-map a cache file; nothing is copied until pixels are touched."""
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot open the data cache {path}: {exc}") from None
    meta = table.schema.metadata or {}
    version = meta.get(_META_FORMAT, b"?").decode()
    if version != str(FORMAT_VERSION) or _META_CLASSES not in meta:
        raise DatasetError(
            f"{path} is a data cache of format {version}, this automl_tl reads format {FORMAT_VERSION}; "
            "delete it and load the data again"
        )
    class_names = tuple(json.loads(meta[_META_CLASSES].decode()))
    described = json.loads(meta.get(_META_SOURCE, b"{}").decode())
    return CacheFile(path, table, class_names, described, source)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # the index is only a shortcut; failing to write it costs a re-decode
