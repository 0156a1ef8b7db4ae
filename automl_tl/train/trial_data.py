"""The data handle every trial of a sweep shares: where the decoded images are and which rows each split holds."""

from __future__ import annotations

import dataclasses

import numpy as np


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
