"""Stream mode: images validated and shrunk by Ray Data into Parquet shards of still-encoded bytes.

    ROOT/<listing key>/*.parquet   one row per record: row, id, label, status, detail, sizes, mode and
                                   ``image`` (JPEG/PNG/WebP bytes at most ``cache_max_side`` a side; null
                                   when the record is skipped)

``ROOT`` is ``data.cache_dir``/shards, or the run's storage (``s3://.../data/shards``) when the driver names
one, so every node reads the same shards and none holds the whole set. The validation is the one of the
decoded cache (:func:`automl_tl.data._decode.decode`, same reasons, same content ids, so the same splits);
what the driver keeps is a small index, a cache file whose ``pixels`` are null and whose source names the
shards (:class:`automl_tl.data.dataset.Dataset` then reads images from them).

An image already small enough keeps its original bytes when they are JPEG, PNG or WebP (re-decoding them
gives the same pixels); a shrunk one is re-encoded as JPEG, anything else as PNG.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from PIL import Image

from automl_tl.config import DataConfig
from automl_tl.data._cache import SCHEMA, CacheWriter
from automl_tl.data._decode import Decoded, decode
from automl_tl.data._files import locate
from automl_tl.data.report import REASON_UNREADABLE, STATUS_OK
from automl_tl.data.sources import DataSource
from automl_tl.errors import DatasetError

__all__ = ["SHARD_SCHEMA", "decoded_cache_bytes", "resolve_mode", "write_shards", "read_rows", "shard_files",
           "decode_image", "ingest_workers"]

logger = logging.getLogger(__name__)

# The cache file's columns of one record, less its listing (path, given split), with the encoded image
SHARD_SCHEMA = pa.schema(
    [("row", pa.int64())]
    + [SCHEMA.field(name) for name in ("id", "label", "status", "detail", "orig_width", "orig_height", "orig_mode",
                                       "width", "height")]  # fmt: skip
    + [("image", pa.binary())]
)
_META_COLUMNS = [name for name in SHARD_SCHEMA.names if name != "image"]
_KEPT_FORMATS = (b"\xff\xd8\xff", b"\x89PNG", b"RIFF")  # JPEG, PNG, WebP (RIFF....WEBP)
_JPEG_QUALITY = 95
_ROWS_PER_FILE = 2048  # a reader holds one file at a time: this bounds a trial's memory, not the set's size
_BATCH_ROWS = 64


def decoded_cache_bytes(images: int, config: DataConfig) -> int:
    """An upper bound on the decoded cache of ``images`` images: every one a square at the cache side."""
    return images * config.cache_max_side * config.cache_max_side * 3


def resolve_mode(config: DataConfig, images: int) -> str:
    """``cache`` or ``stream``: ``data.mode``, or for ``auto`` whether the decoded cache would pass
    ``data.stream_above_gb``."""
    if config.mode != "auto":
        return config.mode
    return "stream" if decoded_cache_bytes(images, config) > config.stream_above_gb * 1e9 else "cache"


def ingest_workers() -> int:
    """Ray Data actors shrinking images: one per CPU of the cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def encode_for_shard(payload: bytes | np.ndarray, item: Decoded) -> bytes:
    """The bytes a shard keeps for a usable image (see the module docstring for which)."""
    shrunk = {item.width, item.height} != {item.orig_width, item.orig_height}
    if isinstance(payload, bytes) and not shrunk and payload[:4].startswith(_KEPT_FORMATS):
        if not payload.startswith(b"RIFF") or payload[8:12] == b"WEBP":
            return payload
    image = Image.frombuffer("RGB", (item.width, item.height), item.pixels or b"", "raw", "RGB", 0, 1)
    out = io.BytesIO()
    if shrunk:
        image.save(out, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    else:
        image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def decode_image(payload: bytes, max_side: int = 1 << 16, max_pixels: int = 1 << 40) -> np.ndarray:
    """A shard's image as HWC uint8 RGB (what ``Dataset.image`` returns in cache mode); shards hold images
    already at most the cache side, so the defaults never shrink one."""
    item = decode(payload, max_side, max_pixels)
    if item.status != STATUS_OK or item.pixels is None:
        raise DatasetError(f"a shard holds an image that no longer decodes ({item.status}: {item.detail})")
    return np.frombuffer(item.pixels, dtype=np.uint8).reshape(item.height, item.width, 3)


class _Shrink:
    """A Ray Data actor: fetch, validate and shrink the records whose numbers it is given."""

    def __init__(self, fetches: Any, labels: Any, max_side: int, max_pixels: int) -> None:
        import ray

        self.fetches = ray.get(fetches) if isinstance(fetches, ray.ObjectRef) else fetches
        self.labels = ray.get(labels) if isinstance(labels, ray.ObjectRef) else labels
        self.max_side, self.max_pixels = max_side, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in SHARD_SCHEMA.names}
        for row in batch["id"].tolist():
            try:
                payload = self.fetches[row]()
            except (OSError, pa.ArrowException) as exc:
                payload, item = b"", Decoded("", REASON_UNREADABLE, f"{type(exc).__name__}: {exc}")
            else:
                item = decode(payload, self.max_side, self.max_pixels)
            image = encode_for_shard(payload, item) if item.status == STATUS_OK else None
            values = (row, item.id, int(self.labels[row]), item.status, item.detail, item.orig_width,
                      item.orig_height, item.orig_mode, item.width, item.height, image)  # fmt: skip
            for name, value in zip(SHARD_SCHEMA.names, values):
                columns[name].append(value)
        return pa.table(columns, schema=SHARD_SCHEMA)


@contextlib.contextmanager
def ray_ready() -> Iterator[None]:
    """The Ray this process is connected to, else one joined (``RAY_ADDRESS``) or started for the block."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        from automl_tl._owned import start_embedded_ray

        start_embedded_ray(num_cpus=os.cpu_count() or 1, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def write_shards(
    sources: Sequence[DataSource], class_names: Sequence[str], root: str, folder: Path, config: DataConfig
) -> Path:
    """Validate and shrink every record of ``sources`` into Parquet shards under ``root`` (a local path or
    a URI) with Ray Data, and write the index cache file into ``folder``; returns the index's path."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    records = [r for s in sources for r in s.records]
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[r.label] for r in records], dtype=np.int32)
    fs, path = _filesystem(root)
    started = time.monotonic()
    with ray_ready():
        workers = ingest_workers()
        logger.info(f"validating images into shards ({workers} Ray Data workers): {len(records)} files",
                    extra={"stage": "data", "files": len(records), "workers": workers})  # fmt: skip
        fetches = ray.put([f for s in sources for f in s.fetchers()])
        fs.delete_dir_contents(path, missing_dir_ok=True)  # an earlier, interrupted write
        ds = ray.data.range(len(records), override_num_blocks=max(1, math.ceil(len(records) / _ROWS_PER_FILE)))
        shrunk = ds.map_batches(
            _Shrink, fn_constructor_args=(fetches, ray.put(labels), config.cache_max_side, config.max_image_pixels),
            batch_size=_BATCH_ROWS, batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=workers),
            num_cpus=1,
        )  # fmt: skip
        shrunk.write_parquet(path, filesystem=fs, max_rows_per_file=_ROWS_PER_FILE)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=_META_COLUMNS).sort_by("row")
    if table.num_rows != len(records) or table.column("row").to_pylist() != list(range(len(records))):
        raise DatasetError(f"the shards in {root} do not hold every record once; delete the folder and load again")
    described = {"source": sources[0].text, "kind": sources[0].kind, "shards": root,
                 "test_source": sources[1].text if len(sources) > 1 else None}  # fmt: skip
    writer = CacheWriter(folder, class_names, config, described)
    try:
        columns = {name: table.column(name).to_pylist() for name in _META_COLUMNS}
        for i, record in enumerate(records):
            item = Decoded(columns["id"][i], columns["status"][i], columns["detail"][i] or "", None,
                           columns["height"][i], columns["width"][i], columns["orig_height"][i],
                           columns["orig_width"][i], columns["orig_mode"][i] or "")  # fmt: skip
            writer.add(record.path, record.label, record.split, item)
        final = writer.finish(tag=root)
    except BaseException:
        writer.abort()
        raise
    elapsed = time.monotonic() - started
    logger.info(f"shards: {len(records)} images in {elapsed:.1f}s into {root}",
                extra={"stage": "data", "files": len(records), "elapsed_s": round(elapsed, 2)})  # fmt: skip
    return final


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    loc = locate(root)
    return loc.fs, loc.path


def shard_files(root: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of the shards under ``root``, in name order."""
    fs, path = _filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot list the shards in {root}: {exc}") from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise DatasetError(f"no shards in {root}: load the data again (data.mode: stream writes them)")
    return fs, files


def read_rows(root: str, rows: np.ndarray, columns: Sequence[str] = ("row", "label", "image")) -> pa.Table:
    """The shard rows numbered ``rows`` (any order in, ascending ``row`` out), only ``columns``."""
    fs, files = shard_files(root)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    wanted = pa.array(np.asarray(rows, dtype=np.int64))
    return dataset.to_table(columns=list(columns), filter=pads.field("row").isin(wanted)).sort_by("row")
