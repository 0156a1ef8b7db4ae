"""Decode one image, once: raw bytes in, an RGB uint8 array at most ``max_side`` on its longer side out.

Anything that is not a usable image becomes a :class:`Decoded` with a reason code instead of an exception,
so one bad file never stops a run (the caller decides when too many are bad). The content hash is taken of
the raw bytes, before decoding, so identical files get identical ids on every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from automl_tl.data.report import (
    REASON_CORRUPT,
    REASON_EMPTY,
    REASON_NOT_IMAGE,
    REASON_OVERSIZED,
    REASON_TRUNCATED,
    REASON_UNSUPPORTED,
    STATUS_OK,
)

_HIGH_DEPTH_16 = ("I;16", "I;16B", "I;16L", "I;16N")
_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


class _Unsupported(Exception):
    """A decodable image in a mode that has no RGB conversion."""


@dataclasses.dataclass(frozen=True)
class Decoded:
    """What one record turned into: pixels and sizes when ``status == "ok"``, else a reason and a detail."""

    id: str
    status: str
    detail: str = ""
    pixels: bytes | None = None
    height: int = 0
    width: int = 0
    orig_height: int = 0
    orig_width: int = 0
    orig_mode: str = ""


def content_id(payload: bytes | np.ndarray) -> str:
    """sha256 of the raw file bytes (or, for an in-memory array, of its shape and bytes)."""
    if isinstance(payload, np.ndarray):
        digest = hashlib.sha256(f"ndarray:{payload.dtype.str}:{payload.shape}:".encode())
        digest.update(np.ascontiguousarray(payload).tobytes())
        return digest.hexdigest()
    return hashlib.sha256(payload).hexdigest()


def decode(payload: bytes | np.ndarray, max_side: int, max_pixels: int) -> Decoded:
    """Validate and decode one image; never raises for bad input."""
    ident = content_id(payload)
    if isinstance(payload, np.ndarray):
        return _from_array(ident, payload, max_side)
    if len(payload) == 0:
        return Decoded(ident, REASON_EMPTY, "the file is empty (0 bytes)")
    try:
        return _from_bytes(ident, payload, max_side, max_pixels)
    except UnidentifiedImageError:
        return Decoded(ident, REASON_NOT_IMAGE, f"not a recognised image format ({len(payload)} bytes)")
    except _Unsupported as exc:
        return Decoded(ident, REASON_UNSUPPORTED, str(exc))
    except Image.DecompressionBombError as exc:
        return Decoded(ident, REASON_OVERSIZED, str(exc))
    except EOFError as exc:
        return Decoded(ident, REASON_TRUNCATED, str(exc) or "unexpected end of file")
    # Decoders of untrusted files fail in many ways (OSError, SyntaxError, ValueError, zlib.error, ...); all
    # of them mean the same thing here: this file cannot be used, and the run goes on without it.
    except Exception as exc:  # noqa: BLE001
        text = f"{type(exc).__name__}: {exc}"
        reason = REASON_TRUNCATED if "truncated" in text.lower() else REASON_CORRUPT
        return Decoded(ident, reason, text)


def _from_bytes(ident: str, payload: bytes, max_side: int, max_pixels: int) -> Decoded:
    with Image.open(io.BytesIO(payload)) as im:
        width, height = im.size
        mode = im.mode
        if width * height > max_pixels:
            return Decoded(
                ident,
                REASON_OVERSIZED,
                f"{width}x{height} = {width * height:,} pixels, over the limit data.max_image_pixels={max_pixels:,}",
            )
        if max(width, height) > max_side and im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: much faster, and we shrink the image anyway.
            scale = max_side / max(width, height)
            im.draft(None, (int(np.ceil(width * scale)), int(np.ceil(height * scale))))
        im.load()  # the first frame of an animation
        upright: Image.Image = im
        if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            upright = ImageOps.exif_transpose(im)
        rgb = to_rgb(upright)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return Decoded(
        ident,
        STATUS_OK,
        pixels=rgb.tobytes(),
        height=rgb.size[1],
        width=rgb.size[0],
        orig_height=height,
        orig_width=width,
        orig_mode=mode,
    )


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels are composited onto white (what a viewer shows)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _HIGH_DEPTH_16 or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA") if mode != "RGBA" else im
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise _Unsupported(f"cannot convert mode {mode} to RGB: {exc}") from None


def _high_depth_to_uint8(arr: np.ndarray[Any, Any], mode: str) -> np.ndarray[Any, Any]:
    """16-bit images map their full range to 8 bits; 32-bit ints as 16-bit when above 255; floats in
    [0, 1] scale by 255, other floats clip to [0, 255]."""
    values = arr.astype(np.float64)
    if mode in _HIGH_DEPTH_16 or (mode == "I" and values.max(initial=0) > 255):
        values = np.clip(values, 0, 65535) / 257.0
    elif mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _from_array(ident: str, arr: np.ndarray[Any, Any], max_side: int) -> Decoded:
    """An in-memory uint8 image (H, W) or (H, W, 3), as shipped by built-in data sets."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        return Decoded(ident, REASON_UNSUPPORTED, f"array of dtype {arr.dtype} and shape {arr.shape}")
    mode = "L" if arr.ndim == 2 else "RGB"
    im = Image.fromarray(arr).convert("RGB")
    height, width = arr.shape[:2]
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        im = im.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    return Decoded(ident, STATUS_OK, pixels=im.tobytes(), height=im.size[1], width=im.size[0],
                   orig_height=height, orig_width=width, orig_mode=mode)
