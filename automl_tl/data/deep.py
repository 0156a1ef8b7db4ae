"""Data diagnostics on a real data set: a frozen backbone's features of every image, then the findings of
:mod:`automl_tl.data.diagnostics`. ``automl-tl inspect DATA --deep`` prints them; a search writes them to
``diagnostics.json`` in its run directory and, with ``data.near_duplicates: drop-across-splits`` (the
default), leaves val and test images that nearly duplicate a train image out of those splits.

The features are those the sweep's frozen trials of the same backbone use (cached next to the data cache,
see :func:`automl_tl.train.features.dataset_features`), so they are computed once per data set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automl_tl.data.diagnostics import Diagnostics, diagnose, leaked_rows, near_duplicates

if TYPE_CHECKING:
    from automl_tl.config import ExperimentConfig
    from automl_tl.data.dataset import Dataset

__all__ = [
    "DIAGNOSTICS_NAME",
    "DIAGNOSTIC_BACKBONE",
    "diagnose_dataset",
    "leak_free_splits",
    "searched_features",
    "write_run_diagnostics",
]

logger = logging.getLogger(__name__)
_DATA, _DIAGNOSTICS = {"stage": "data"}, {"stage": "diagnostics"}

DIAGNOSTICS_NAME = "diagnostics.json"
# The registered backbone `inspect --deep` uses: the first of the default search space, so a search with
# the defaults reuses its features.
DIAGNOSTIC_BACKBONE = "tf_efficientnet_lite0"


def diagnose_dataset(dataset: Dataset, backbone: str = DIAGNOSTIC_BACKBONE, image_size: int | None = None) -> Diagnostics:
    """Every finding for ``dataset``, on ``backbone``'s features of all its images at ``image_size``."""
    from automl_tl.train.features import dataset_features

    features = dataset_features(dataset.cache_path, backbone, image_size)
    return diagnose(features, dataset.labels, dataset.splits, dataset.paths, dataset.class_names, seed=dataset.config.seed)


def searched_features(config: ExperimentConfig) -> tuple[str, int | None]:
    """The backbone and image size whose features the diagnostics of a search use: the first searched,
    so that backbone's frozen trials at that size reuse them."""
    return config.space.backbones[0], (config.space.image_sizes[0] if config.space.image_sizes else None)


def leak_free_splits(
    dataset: Dataset, config: ExperimentConfig
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Row indices of train, val and test, less (with ``data.near_duplicates: drop-across-splits``) the val
    and test images that nearly duplicate a train image; says how many it left out. Only the near-duplicate
    finding runs here: the label-error heads wait for :func:`write_run_diagnostics` after the sweep."""
    train, val, test = (np.asarray(dataset.indices(s), dtype=np.int64) for s in ("train", "val", "test"))
    if config.data.near_duplicates == "keep" or len(val) + len(test) == 0:
        return train, val, test
    backbone, size = searched_features(config)
    logger.info(f"checking val and test for near-duplicates of train images ({backbone} features of all "
                f"{len(dataset)} images, computed once and shared with its frozen trials)", extra=_DATA)  # fmt: skip
    from automl_tl.train.features import dataset_features

    features = dataset_features(dataset.cache_path, backbone, size)
    pairs = near_duplicates(features, dataset.labels, dataset.splits, dataset.paths)
    leaked = leaked_rows(pairs, dataset.splits)
    if leaked.size:
        logger.info(f"left out {leaked.size} val/test image(s) that nearly duplicate a train image (val "
            f"{int(np.isin(val, leaked).sum())}, test {int(np.isin(test, leaked).sum())}); "
            "data.near_duplicates: keep keeps them", extra=_DATA)  # fmt: skip
    return train, np.setdiff1d(val, leaked), np.setdiff1d(test, leaked)


def write_run_diagnostics(run_dir: str | Path) -> Diagnostics | None:
    """``diagnostics.json`` in a finished sweep's run directory, from the features of
    :func:`searched_features`; a failure is said and the run goes on (diagnostics never cost a search its results)."""
    from automl_tl.config import load_config
    from automl_tl.data.dataset import Dataset
    from automl_tl.errors import AutoMLError
    from automl_tl.runs.rundir import RunDir
    from automl_tl.runs.storage import local_data_cache

    run = RunDir.open(run_dir)
    try:
        config = load_config(run.path / "config.yaml")
        data = run.read_json("data.json")
        dataset = Dataset.open(local_data_cache(data), config.data)
        found = diagnose_dataset(dataset, *searched_features(config))
    except (AutoMLError, OSError, ValueError, RuntimeError) as exc:  # torch and faiss raise RuntimeError
        logger.warning(f"skipped ({type(exc).__name__}: {exc})", extra=_DIAGNOSTICS)
        return None
    run.write_json(DIAGNOSTICS_NAME, found.to_dict())
    run.push(DIAGNOSTICS_NAME)
    kinds = sum(d.kind == "cross-split" for d in found.near_duplicates)
    logger.info(f"{len(found.label_issues)} likely label errors, {len(found.near_duplicates)} near-duplicate "
                f"pairs ({kinds} across splits), {len(found.outliers)} outliers: {DIAGNOSTICS_NAME}", extra=_DIAGNOSTICS)  # fmt: skip
    return found
