"""What the predictor accepts as an image, turned into the pixels the data set would have trained on.

A file is decoded by the data set's own decoder (:func:`automl_tl.data._decode.decode`: upright per EXIF,
transparency onto white, shrunk to the artifact's ``decode.max_side``), as serving decodes a request's
image; a PIL image or a uint8 array goes through the same conversion to RGB and the same shrinking.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from automl_tl.data._decode import Decoded, decode, to_rgb
from automl_tl.errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "ImageInput", "expand_image_paths", "load_image"]

ImageInput = Image.Image | np.ndarray | str | os.PathLike[str]
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit, also the data set's default


def load_image(item: ImageInput, max_side: int | None = None) -> np.ndarray:
    """One input as a writable HWC uint8 RGB array at most ``max_side`` on its longer side: a file path, a PIL
    image or a uint8 array (HW, or HWC with 1, 3 or 4 channels)."""
    side = max_side or sys.maxsize
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            payload = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}") from None
        return _pixels(decode(payload, side, _MAX_PIXELS), f"image {path}")
    if isinstance(item, Image.Image):
        return _pixels(decode(np.asarray(to_rgb(item)), side, _MAX_PIXELS), "the PIL image")
    if isinstance(item, np.ndarray):
        return _pixels(decode(_rgb_array(item), side, _MAX_PIXELS), f"the array of shape {item.shape}")
    raise DatasetError(f"cannot predict on a {type(item).__name__}: pass a file path, a PIL image or a uint8 array")


def _rgb_array(item: np.ndarray) -> np.ndarray:
    """A uint8 HW or HWC3 array for the decoder: one channel squeezed, an alpha channel flattened onto white."""
    if item.dtype != np.uint8:
        raise DatasetError(f"image arrays must be uint8 (0-255), got dtype {item.dtype} of shape {item.shape}")
    if item.ndim == 3 and item.shape[2] == 1:
        return item[:, :, 0]
    if item.ndim == 3 and item.shape[2] == 4:
        return np.asarray(to_rgb(Image.fromarray(item)))
    if item.ndim == 2 or (item.ndim == 3 and item.shape[2] == 3):
        return item
    raise DatasetError(f"image arrays must be HxW or HxWx1/3/4, got shape {item.shape}")


def _pixels(decoded: Decoded, what: str) -> np.ndarray:
    if decoded.status != "ok" or decoded.pixels is None:
        raise DatasetError(f"cannot decode {what}: {decoded.status}: {decoded.detail}")
    # a copy: the decoder's buffer is read-only, and torch warns on read-only arrays
    return np.frombuffer(decoded.pixels, np.uint8).reshape(decoded.height, decoded.width, 3).copy()


def expand_image_paths(items: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, folders expanded to the image files under them (sorted, hidden files skipped)."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not found:
                raise DatasetError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise DatasetError(f"{path}: no such file or folder")
    return out
