"""The data handle every trial of a sweep shares, and how a stream-mode trial reads its images.

A stream-mode data set (``data.mode: stream``) keeps its images encoded in Parquet shards on the run's storage.
A trial reads its split (a DDP rank: its share) from them directly, one shard file at a time
(:func:`stream_batches`), so its memory does not grow with the set. :func:`stream_dataset` is the same rows as
a Ray Dataset whose decoding and augmentation run in Ray Data's CPU workers (the feature pass before the
trials uses it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["TrialData", "stream_batches", "stream_dataset", "decode_batch"]


@dataclasses.dataclass(frozen=True)
class TrialData:
    """What every trial needs to find its images: shared once through the Ray object store."""

    cache_path: str
    data_id: str
    class_names: tuple[str, ...]
    train_idx: np.ndarray
    val_idx: np.ndarray
    labels: np.ndarray
    feature_cache_dir: str
    # The cache file on the run's shared storage (s3://...) when nodes cannot open ``cache_path`` directly:
    # each node then downloads it once into its own cache (``automl_tl.runs.storage.localize_data``).
    shared_cache: str | None = None
    # Stream mode: where the encoded shards are (``cache_path`` is then their index, without pixels) and
    # where the features computed once for the cluster are kept (the run's storage).
    shards: str | None = None
    shared_features: str | None = None


Transform = Callable[[torch.Tensor], torch.Tensor]


def stream_batches(
    shards: str, file_rows: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, transform: Transform,
    max_side: int = 1 << 16,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``transform``-ed images of the shard rows ``file_rows`` (labelled ``labels``), in an order
    drawn from ``seed``: shard files in a shuffled order, rows shuffled within each file. A row listed twice
    (a class-balancing sampler draws with replacement) comes twice, augmented apart. One file is held at a
    time; a batch may span two files. A trailing single image is dropped (a norm needs two)."""
    from automl_tl.data.shards import shard_files

    import pyarrow.dataset as pads
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    label_of = dict(zip(np.asarray(file_rows, dtype=np.int64).tolist(), np.asarray(labels).tolist()))
    copies = collections.Counter(np.asarray(file_rows, dtype=np.int64).tolist())
    wanted = pa.array(np.fromiter(label_of, dtype=np.int64, count=len(label_of)))
    fs, files = shard_files(shards)
    images: list[torch.Tensor] = []
    targets: list[int] = []
    for k in rng.permutation(len(files)):
        table = pads.dataset(files[int(k)], filesystem=fs, format="parquet").to_table(
            columns=["row", "image"], filter=pads.field("row").isin(wanted)
        )
        rows, payloads = table.column("row").to_pylist(), table.column("image").to_pylist()
        del table
        order = [j for j in rng.permutation(len(rows)).tolist() for _ in range(copies[rows[j]])]
        for j in rng.permutation(order).tolist():
            images.append(transform(_tensor(payloads[j], max_side)))
            targets.append(label_of[rows[j]])
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(targets, dtype=torch.long)
                images, targets = [], []
    if len(images) > 1 or (images and batch_size == 1):
        yield torch.stack(images), torch.tensor(targets, dtype=torch.long)


def _tensor(payload: bytes, max_side: int) -> torch.Tensor:
    """A shard's image as a CHW uint8 tensor (the layout the augmentations take)."""
    from automl_tl.data.shards import decode_image

    return torch.from_numpy(decode_image(payload, max_side).copy()).permute(2, 0, 1)


def decode_batch(batch: dict[str, Any], transform: Transform, wanted: np.ndarray) -> dict[str, np.ndarray]:
    """One Ray Data batch of shard rows to model inputs, only the rows in ``wanted`` (sorted): ``x`` (N, C, H, W
    float32), ``y`` and ``row``."""
    rows = np.asarray(batch["row"], dtype=np.int64)
    keep = np.flatnonzero(np.isin(rows, wanted, assume_unique=True))
    images = [transform(_tensor(bytes(batch["image"][i]), 1 << 16)) for i in keep]
    x = torch.stack(images).numpy() if images else np.zeros((0, 3, 1, 1), dtype=np.float32)
    return {"x": x, "y": np.asarray(batch["label"], dtype=np.int64)[keep], "row": rows[keep]}


def stream_dataset(shards: str, file_rows: np.ndarray, transform: Transform, batch_size: int = 32) -> Any:
    """The shard rows ``file_rows`` as a Ray Dataset of decoded, transformed images (``x``, ``y``, ``row``),
    decoded in Ray Data's CPU workers: what Ray Train hands each worker with ``get_dataset_shard``."""
    import ray.data

    from automl_tl.data.shards import shard_files

    fs, files = shard_files(shards)
    wanted = np.unique(np.asarray(file_rows, dtype=np.int64))
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(["row", "label", "image"])
    return ds.map_batches(functools.partial(decode_batch, transform=transform, wanted=wanted), batch_size=batch_size,
                          batch_format="numpy")  # fmt: skip
