"""Pooled features of a frozen backbone, computed once per (data, backbone, image size) and shared.

Every trial that freezes the whole feature extractor and uses a deterministic transform sees exactly the
same features, so the first such trial computes them for the train and validation splits and writes them
next to the data cache; the others (in any process on the machine) wait on a file lock and load them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from automl_tl.train.augment import array_to_tensor, train_transform
from automl_tl.backbones import TransferNet, memory_format_for
from automl_tl.inference.transforms import Preprocessing
from automl_tl.runs.storage import atomic_path

if TYPE_CHECKING:
    from automl_tl.train.trial_data import TrialData

__all__ = ["FeatureSet", "cached_features", "dataset_features", "feature_key"]


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    train: torch.Tensor
    val: torch.Tensor
    hit: bool  # True when the features came from the cache


def feature_key(data_id: str, backbone: str, pre: Preprocessing, train_idx: np.ndarray, val_idx: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(repr((data_id, backbone, sorted(pre.to_dict().items()))).encode())
    digest.update(np.ascontiguousarray(train_idx, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(val_idx, dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


def cached_features(
    data: TrialData, backbone: str, pre: Preprocessing, model: TransferNet, batch_size: int = 32, flip: bool = False
) -> FeatureSet:
    """Train and validation features of ``model``'s frozen extractor, from the cache when present; ``flip``:
    of the images mirrored left to right (what test-time augmentation also shows a member)."""
    whole = _whole_path(data.cache_path, data.feature_cache_dir, backbone, pre)
    if whole.is_file() and not flip:  # every image's features, computed for the data diagnostics: slice them
        with np.load(whole) as stored:
            rows = stored["features"]
            return FeatureSet(torch.from_numpy(rows[data.train_idx]), torch.from_numpy(rows[data.val_idx]), hit=True)
    path = _trial_path(data, backbone, pre, flip)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process computes; the rest wait and then read
        if not path.is_file() and data.shared_features and not flip:  # computed once for the cluster (stream)
            from automl_tl.runs.storage import download, join

            download(join(data.shared_features, path.name), path)
        if path.is_file():
            with np.load(path) as stored:
                return FeatureSet(torch.from_numpy(stored["train"]), torch.from_numpy(stored["val"]), hit=True)
        train = _compute(data, data.train_idx, pre, model, batch_size, flip)
        val = _compute(data, data.val_idx, pre, model, batch_size, flip)
        with atomic_path(path) as partial:
            np.savez(partial, train=train, val=val)
    return FeatureSet(torch.from_numpy(train), torch.from_numpy(val), hit=False)


def _trial_path(data: TrialData, backbone: str, pre: Preprocessing, flip: bool = False) -> Path:
    """Where the train and validation features of one backbone and preprocessing (of mirrored images with
    ``flip``) are kept on this node."""
    key = feature_key(data.data_id, backbone, pre, data.train_idx, data.val_idx)
    name = f"{backbone.replace(':', '_')}-{pre.input_size}-{key}{'-hflip' if flip else ''}.npz"
    return Path(data.feature_cache_dir) / name


def dataset_features(
    cache_path: str | Path, backbone: str, image_size: int | None = None, batch_size: int = 32
) -> np.ndarray:
    """Features of every image of the data set in ``cache_path`` (rows as ``Dataset.open`` numbers them),
    by ``backbone``'s frozen extractor at ``image_size`` (None: its native size); cached next to the
    trials' features, which then slice them instead of computing their own."""
    from automl_tl.backbones import create_backbone, resolve_spec
    from automl_tl.data import Dataset
    from automl_tl.train.trial_data import TrialData

    spec = resolve_spec(backbone)
    pre = Preprocessing.from_spec(spec, image_size)
    folder = Path(cache_path).parent / "features"
    path = _whole_path(str(cache_path), str(folder), backbone, pre)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            with np.load(path) as stored:
                cached: np.ndarray = stored["features"]
                return cached
        rows = np.arange(len(Dataset.open(Path(cache_path))), dtype=np.int64)
        data = TrialData(str(cache_path), Path(cache_path).stem, (), rows, rows[:0], rows, str(folder))
        model = create_backbone(backbone, num_classes=2, freeze_depth=spec.max_freeze_depth)
        features = _compute(data, rows, pre, model, batch_size)
        with atomic_path(path) as partial:
            np.savez(partial, features=features)
    return features


def _whole_path(cache_path: str, folder: str, backbone: str, pre: Preprocessing) -> Path:
    """Where :func:`dataset_features` keeps every image's features of one backbone and preprocessing."""
    key = feature_key(Path(cache_path).stem + ":all", backbone, pre, np.zeros(0), np.zeros(0))
    return Path(folder) / f"{backbone.replace(':', '_')}-{pre.input_size}-all-{key}.npz"


def _compute(
    data: TrialData, rows: np.ndarray, pre: Preprocessing, model: TransferNet, batch_size: int, flip: bool = False
) -> np.ndarray:
    from automl_tl.data import Dataset

    images = Dataset.open(Path(data.cache_path))
    transform = train_transform("none", pre)
    fmt = memory_format_for(torch.device("cpu"))
    # Outside inference mode: converting the layout makes new parameter tensors, and ones made in inference
    # mode could not be trained afterwards (LP-FT fine-tunes this same model).
    model.eval().to(memory_format=fmt)
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            rows_in = rows[start : start + batch_size]
            batch = torch.stack([transform(array_to_tensor(images.image(int(i)))) for i in rows_in])
            if flip:
                batch = torch.flip(batch, dims=(3,))  # as TestTimeAugmented mirrors a served input
            out.append(model.forward_features(batch.contiguous(memory_format=fmt)).float())
    features: np.ndarray = torch.cat(out).numpy() if out else np.zeros((0, model.spec.feature_width), np.float32)
    return features


# --- stream mode: features once for the cluster, with Ray Data --------------------------------------------


class _Extract:
    """A Ray Data actor holding one frozen extractor: decoded batches in, pooled features out."""

    def __init__(self, backbone: str, image_size: int, use_gpu: bool) -> None:
        from automl_tl.backbones import create_backbone, resolve_spec

        spec = resolve_spec(backbone)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.fmt = memory_format_for(self.device)
        model = create_backbone(backbone, num_classes=2, freeze_depth=spec.max_freeze_depth, image_size=image_size)
        self.model = model.eval().to(self.device).to(memory_format=self.fmt)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(batch["x"]).to(self.device).contiguous(memory_format=self.fmt)
        return {"row": batch["row"], "features": self.model.forward_features(x).float().cpu().numpy()}


def frozen_combinations(backbones: tuple[str, ...], image_sizes: tuple[int, ...], freeze_depths: tuple[int, ...],
                        augmentations: tuple[str, ...]) -> list[tuple[str, int]]:  # fmt: skip
    """The (backbone, image size) pairs of a search space whose trials may train on frozen features."""
    from automl_tl.backbones import resolve_spec
    from automl_tl.train.augment import is_deterministic

    if not any(is_deterministic(a) for a in augmentations):
        return []
    out = []
    for name in backbones:
        spec = resolve_spec(name)
        if freeze_depths and max(freeze_depths) < spec.max_freeze_depth:
            continue
        out += [(name, size) for size in (image_sizes or (spec.input_size,))]
    return out


def stream_features(data: TrialData, combinations: list[tuple[str, int]], use_gpu: bool = False) -> list[str]:
    """Compute, before the trials, the train and validation features every frozen trial of a stream-mode sweep
    reads: images decoded by Ray Data's CPU tasks, features by an actor per GPU (one on CPU), written where
    :func:`cached_features` looks (and to ``data.shared_features``, for the other nodes). Returns the files."""
    import ray
    from ray.data import ActorPoolStrategy

    from automl_tl.backbones import resolve_spec
    from automl_tl.data import Dataset
    from automl_tl.train.trial_data import stream_dataset

    if data.shards is None:
        return []
    index = Dataset.open(Path(data.cache_path))
    order = np.concatenate([data.train_idx, data.val_idx])
    file_rows = index.file_rows(order)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 0
    written = []
    for backbone, size in combinations:
        pre = Preprocessing.from_spec(resolve_spec(backbone), size)
        path = _trial_path(data, backbone, pre)
        if path.is_file():
            continue
        decoded = stream_dataset(data.shards, file_rows, train_transform("none", pre))
        features = decoded.map_batches(
            _Extract, fn_constructor_args=(backbone, pre.input_size, gpus > 0), batch_size=32, batch_format="numpy",
            compute=ActorPoolStrategy(size=max(1, gpus)), num_gpus=1 if gpus else 0, num_cpus=1,
        )  # fmt: skip
        by_row: dict[int, np.ndarray] = {}
        for batch in features.iter_batches(batch_format="numpy", batch_size=None):
            by_row.update(zip(batch["row"].tolist(), batch["features"]))
        rows = np.stack([by_row[int(r)] for r in file_rows]).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial:
            np.savez(partial, train=rows[: len(data.train_idx)], val=rows[len(data.train_idx) :])
        if data.shared_features:
            from automl_tl.runs.storage import join, upload

            upload(path, join(data.shared_features, path.name))
        written.append(str(path))
    return written
