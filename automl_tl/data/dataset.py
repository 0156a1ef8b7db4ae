"""A validated, split data set: plain numpy over one memory-mapped cache file.

Every trial of a sweep opens the same file (``Dataset.open(dataset.cache_path, config)``, or by unpickling
a Dataset, which does the same): pages are shared through the OS page cache, nothing is decoded again, and
``iter_batches`` walks the file without ever holding more than a batch, so data larger than memory streams.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from automl_tl.config import DataConfig
from automl_tl.data._cache import CacheFile, open_cache
from automl_tl.data._split import (
    SPLITS, class_count_problems, draw_splits, drawn_splits, order_keys, refuse, select_rows,
)
from automl_tl.data.report import STATUS_OK, DataReport, DuplicateGroup, SizeStats, SkippedFile
from automl_tl.errors import DatasetError

__all__ = ["Dataset", "ImageBatch", "ListingInfo"]


class ImageBatch(NamedTuple):
    """Images of one batch (read-only HWC uint8 views; sizes vary), their labels and data set indices."""

    indices: np.ndarray[Any, Any]
    images: tuple[np.ndarray[Any, Any], ...]
    labels: np.ndarray[Any, Any]


@dataclasses.dataclass(frozen=True)
class ListingInfo:
    """What only a fresh listing of the source knows (the cache file holds everything else)."""

    source: str
    kind: str
    test_source: str | None
    skipped: tuple[SkippedFile, ...] = ()
    ignored: int = 0


class Dataset:
    """Images, labels and splits of one data set. Build it with :func:`load_dataset` or :meth:`open`."""

    def __init__(
        self, cache: CacheFile, config: DataConfig, listing: ListingInfo | None, cache_hit: bool, strict: bool = True
    ) -> None:
        table = cache.table
        status = _strings(table, "status")
        ids = _strings(table, "id")
        file_labels = _ints(table, "label").astype(np.int64)
        given = _strings(table, "split_given").astype("<U5")
        source = listing.source if listing else str(cache.source.get("source", cache.path))
        _check_readable(status, table, source, config)
        rows, groups = select_rows(np.flatnonzero(status == STATUS_OK), ids, file_labels, given, config.drop_duplicates)
        if rows.size == 0:
            raise DatasetError(f"no images in {source}")
        problems = class_count_problems(file_labels[rows], cache.class_names, source)
        splits, split_problems = draw_splits(
            order_keys(ids[rows], config.seed), file_labels[rows], given[rows], cache.class_names,
            val_fraction=config.val_fraction, test_fraction=config.test_fraction,
        )
        problems += split_problems
        if strict:  # `inspect` (strict=False) lists them instead; a sweep cannot run on them
            refuse(problems)
        self._cache = cache
        self._rows = rows
        self._heights = _ints(table, "height")
        self._widths = _ints(table, "width")
        self._chunks: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] | None = None
        self._chunk_starts = np.cumsum([0] + [len(c) for c in table.column("pixels").chunks])
        self.config = config
        self.cache_path = cache.path
        self.class_names: tuple[str, ...] = cache.class_names
        self.labels = _frozen(file_labels[rows])
        self.splits = _frozen(splits)
        self.ids = _frozen(ids[rows])
        self.paths = _frozen(_strings(table, "path")[rows])
        # Stream mode: the cache file is an index (no pixels) and the images sit encoded in these shards.
        shards = cache.source.get("shards")
        self.shards: str | None = str(shards) if shards else None
        self._encoded: dict[int, bytes] = {}
        self.report = _build_report(self, status, given, groups, listing, cache_hit, tuple(problems))

    @classmethod
    def open(cls, cache_path: str | Path, config: DataConfig | None = None) -> Dataset:
        """Reopen a data set from its cache file alone (what a trial in another process does).

        Pass the DataConfig the data set was loaded with: the seed and fractions decide the split.
        """
        return cls(open_cache(Path(cache_path)), config if config is not None else DataConfig(), None, True)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling (e.g. into a Ray task) sends the path and config only; the receiver maps the same file.
        return (Dataset.open, (self.cache_path, self.config))

    def __len__(self) -> int:
        return int(self._rows.size)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={int((self.splits == s).sum())}" for s in SPLITS)
        return f"Dataset({len(self)} images, {len(self.class_names)} classes, {sizes}, cache={self.cache_path})"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> np.ndarray[Any, Any]:
        """Indices (into labels, ids, image()) of the images in ``split``, ascending."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == split)

    def file_rows(self, indices: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The rows of the cache file (and of a stream-mode data set's shards) that hold images ``indices``."""
        rows: np.ndarray[Any, Any] = self._rows[np.asarray(indices, dtype=np.int64)]
        return rows

    def image(self, index: int) -> np.ndarray[Any, Any]:
        """Image ``index`` as HWC uint8 RGB, at most ``cache_max_side`` on its longer side (a read-only view
        into the memory-mapped cache: copy it before changing it)."""
        row = int(self._rows[index])
        if self.shards is not None:
            return self._shard_image(index, row)
        chunks = self._chunk_views()
        k = int(np.searchsorted(self._chunk_starts, row, side="right")) - 1
        offsets, data = chunks[k]
        local = row - int(self._chunk_starts[k])
        flat = data[offsets[local] : offsets[local + 1]]
        return flat.reshape(int(self._heights[row]), int(self._widths[row]), 3)

    def iter_batches(
        self, split: str, batch_size: int, *, shuffle_seed: int | None = None, drop_last: bool = False
    ) -> Iterator[ImageBatch]:
        """Stream ``split`` in batches. Without a seed the file is read front to back (streaming-friendly
        for data larger than memory); with one, in a seeded random order."""
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        order = self.indices(split)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(order)
        for start in range(0, order.size, batch_size):
            chunk = order[start : start + batch_size]
            if drop_last and chunk.size < batch_size:
                return
            yield ImageBatch(chunk, tuple(self.image(int(i)) for i in chunk), self.labels[chunk])

    def _shard_image(self, index: int, row: int) -> np.ndarray[Any, Any]:
        """An image of a stream-mode data set: its whole split is read from the shards on first use (the
        evaluation of a split touches every image of it), one split held at a time."""
        from automl_tl.data.shards import decode_image, read_rows

        payload = self._encoded.get(row)
        if payload is None:
            rows = self._rows[self.indices(str(self.splits[index]))]
            table = read_rows(self.shards or "", rows, ("row", "image"))
            self._encoded = dict(zip(table.column("row").to_pylist(), table.column("image").to_pylist()))
            payload = self._encoded.get(row)
            if payload is None:
                raise DatasetError(f"image {self.paths[index]} (row {row}) is missing from the shards in {self.shards}")
        return decode_image(payload, self.config.cache_max_side, self.config.max_image_pixels)

    def _chunk_views(self) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
        if self._chunks is None:
            views = []
            for chunk in self._cache.table.column("pixels").chunks:
                buffers = chunk.buffers()
                offsets = np.frombuffer(buffers[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
                data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
                views.append((offsets, data))
            self._chunks = views
        return self._chunks


def _check_readable(status: np.ndarray[Any, Any], table: pa.Table, source: str, config: DataConfig) -> None:
    total = status.size
    if total == 0:
        raise DatasetError(f"no images found in {source}")
    bad = np.flatnonzero(status != STATUS_OK)
    if bad.size == 0:
        return
    paths = table.column("path")
    examples = "; ".join(f"{paths[int(i)].as_py()}: {status[i]}" for i in bad[:3])
    if bad.size == total:
        raise DatasetError(f"none of the {total} files in {source} is a readable image (e.g. {examples})")
    share = bad.size / total
    if share > config.max_unreadable_fraction:
        raise DatasetError(
            f"{bad.size} of {total} files in {source} ({share:.1%}) cannot be used, more than "
            f"data.max_unreadable_fraction={config.max_unreadable_fraction} allows (e.g. {examples}); "
            "run `automl-tl inspect` for the full list"
        )


def _build_report(
    ds: Dataset,
    status: np.ndarray[Any, Any],
    given: np.ndarray[Any, Any],
    groups: list[Any],
    listing: ListingInfo | None,
    cache_hit: bool,
    problems: tuple[str, ...],
) -> DataReport:
    table = ds._cache.table
    paths = _strings(table, "path")
    file_labels = _ints(table, "label")
    bad = np.flatnonzero(status != STATUS_OK)
    details = table.column("detail")
    skipped = [SkippedFile(str(paths[i]), str(status[i]), details[int(i)].as_py() or "") for i in bad]
    skipped += list(listing.skipped) if listing else []
    skipped.sort(key=lambda s: s.path)
    names = ds.class_names
    duplicates = tuple(
        DuplicateGroup(
            g.id,
            tuple(str(paths[r]) for r in g.rows),
            tuple(names[int(file_labels[r])] for r in g.rows),
            tuple(str(paths[r]) for r in g.kept),
        )
        for g in sorted(groups, key=lambda g: str(paths[g.rows[0]]))
    )
    counts = {
        s: {name: int(n) for name, n in zip(names, np.bincount(ds.labels[ds.splits == s], minlength=len(names)))}
        for s in SPLITS
    }
    rows = ds._rows
    widths = _ints(table, "orig_width")[rows]
    heights = _ints(table, "orig_height")[rows]
    sizes = SizeStats(
        int(widths.min()), float(np.median(widths)), int(widths.max()),
        int(heights.min()), float(np.median(heights)), int(heights.max()),
        int(max(ds._widths[rows].max(), ds._heights[rows].max())),
    )
    modes = collections.Counter(_strings(table, "orig_mode")[rows].tolist())
    described = ds._cache.source
    given_set = set(given.tolist()) - {""}
    return DataReport(
        source=listing.source if listing else str(described.get("source", ds.cache_path)),
        kind=listing.kind if listing else str(described.get("kind", "cache")),
        test_source=listing.test_source if listing else described.get("test_source"),
        class_names=names,
        files_seen=int(status.size) + (len(listing.skipped) if listing else 0),
        images=len(ds),
        counts=counts,
        given_splits=tuple(s for s in SPLITS if s in given_set),
        drawn_splits=drawn_splits(given_set, ds.config.test_fraction),
        seed=ds.config.seed,
        val_fraction=ds.config.val_fraction,
        test_fraction=ds.config.test_fraction,
        sizes=sizes,
        modes=dict(sorted(modes.items())),
        skipped=tuple(skipped),
        duplicates=duplicates,
        duplicates_dropped=int((status == STATUS_OK).sum()) - len(ds),
        ignored_files=listing.ignored if listing else 0,
        cache_path=str(ds.cache_path),
        cache_hit=cache_hit,
        problems=problems,
        data_mode="stream" if ds.shards else "cache",
        shards=ds.shards,
        mode_setting=f"{ds.config.mode}, streams above {ds.config.stream_above_gb:g} GB decoded",
    )


def _ints(table: pa.Table, name: str) -> np.ndarray[Any, Any]:
    # Straight from the Arrow buffers (the int32 columns have no nulls): pyarrow's to_numpy imports pandas
    # on first use, which alone would cost several times a whole re-load.
    chunks = [
        np.frombuffer(c.buffers()[1], dtype=np.int32)[c.offset : c.offset + len(c)]
        for c in table.column(name).chunks
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def _strings(table: pa.Table, name: str) -> np.ndarray[Any, Any]:
    out = np.empty(table.num_rows, dtype=object)
    out[:] = table.column(name).to_pylist()
    return out


def _frozen(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    arr.setflags(write=False)
    return arr
