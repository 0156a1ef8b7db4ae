"""Built-in data sets that ship inside a wheel and work offline: ``builtin:animal-shapes``.

animal-shapes: 10,000 silhouettes, 28x28 grey, 1,000 per class, from the MIT-licensed PyPI package
``animal-shape-mnist`` (``data/Animal Shape/*.gz``, gzip pickles of numpy arrays). Its own loader imports
TensorFlow, so we read the two files directly, with an unpickler that only rebuilds plain numpy arrays.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from automl_tl.data._records import DataSource, Fetch, Record
from automl_tl.errors import DatasetError

_PACKAGE = "animal_shape_mnist"
_PIP_NAME = "animal-shape-mnist==0.39"
# Label i of the package is ANIMAL_SHAPES[i] (the order its README lists them, checked against the images).
ANIMAL_SHAPES: tuple[str, ...] = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)
BUILTINS: tuple[str, ...] = ("animal-shapes",)


def builtin_source(text: str) -> DataSource:
    name = text.split(":", 1)[1].strip().lower()
    if name not in BUILTINS:
        available = ", ".join("builtin:" + b for b in BUILTINS)
        raise DatasetError(f"unknown built-in data set {name!r}; available: {available}")
    folder = _package_data_folder()
    data_file, label_file = folder / "animal_data_version_3.gz", folder / "animal_label_version_3.gz"
    for f in (data_file, label_file):
        if not f.is_file():
            raise DatasetError(f"builtin:animal-shapes: {f} is missing; reinstall it: pip install {_PIP_NAME}")
    labels = _load_array(label_file)
    if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(ANIMAL_SHAPES):
        raise DatasetError(f"builtin:animal-shapes: unexpected labels in {label_file}; reinstall {_PIP_NAME}")
    records = tuple(
        Record(f"animal-shapes/{ANIMAL_SHAPES[int(y)]}/{i:05d}", ANIMAL_SHAPES[int(y)], "")
        for i, y in enumerate(labels)
    )
    version = importlib.metadata.version(_PACKAGE)
    stats = [f"{f.name}\t{f.stat().st_size}\t{f.stat().st_mtime_ns}" for f in (data_file, label_file)]
    identity = hashlib.sha256(f"builtin:animal-shapes\t{version}\n{chr(10).join(stats)}".encode()).hexdigest()
    return DataSource(
        "builtin:animal-shapes", "builtin", records, ANIMAL_SHAPES, (), 0, identity,
        functools.partial(_fetchers, data_file, len(records)),
    )


def _package_data_folder() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"builtin:animal-shapes needs the package {_PIP_NAME}: pip install {_PIP_NAME}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal Shape"


def _fetchers(data_file: Path, count: int) -> Iterator[Fetch]:
    images = _load_array(data_file)
    if images.shape[0] != count or images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"builtin:animal-shapes: unexpected images in {data_file}; reinstall {_PIP_NAME}")
    for image in images:
        yield functools.partial(_constant, image)


def _constant(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return image


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: a pickle that names any other callable is refused."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            return np.zeros(0).__reduce__()[0]  # numpy's own reconstructor, wherever this version keeps it
        return np.ndarray if name == "ndarray" else np.dtype


def _load_array(path: Path) -> np.ndarray[Any, Any]:
    try:
        with gzip.open(path, "rb") as fh:
            value = _ArrayOnlyUnpickler(fh).load()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"builtin:animal-shapes: cannot read {path}: {exc}; reinstall {_PIP_NAME}") from None
    if not isinstance(value, np.ndarray):
        raise DatasetError(f"builtin:animal-shapes: {path} does not hold an array; reinstall {_PIP_NAME}")
    return value
