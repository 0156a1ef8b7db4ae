"""From an HTTP request body to checked RGB pixels: every way a body can be wrong is a :class:`RequestError`.

Three body forms carry images to ``POST /v1/predict``:

* a raw image, ``Content-Type: image/...``;
* ``multipart/form-data`` with one or more file parts;
* JSON ``{"images": ["<base64>", ...]}`` (a ``data:image/...;base64,`` prefix is accepted).

Images are decoded exactly as the data set decodes files (``automl_tl.data._decode``: upright per EXIF,
transparency onto white, shrunk to the artifact's ``decode.max_side``), so the server answers what the
:class:`~automl_tl.inference.predictor.Predictor` answers for the same file. The pixel count is checked from the
header, before any pixel is decoded. No Ray and no web framework here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.parser
import email.policy
import json
import sys
from typing import Any

import numpy as np

from automl_tl.data._decode import decode
from automl_tl.data.report import REASON_EMPTY, REASON_OVERSIZED
from automl_tl.errors import AutoMLError

__all__ = ["BodyLimits", "RawImage", "RequestError", "decode_image", "split_body", "SUPPORTED_CONTENT_TYPES"]

SUPPORTED_CONTENT_TYPES = ("image/*", "multipart/form-data", "application/json")


class RequestError(AutoMLError):
    """A request the server cannot use; ``status`` is the HTTP status it answers with (always a 4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class BodyLimits:
    max_body_bytes: int
    max_images: int


@dataclasses.dataclass(frozen=True)
class RawImage:
    """The encoded bytes of one image and what to call it in messages (file name or ``images[i]``)."""

    name: str
    payload: bytes


def split_body(content_type: str | None, body: bytes, limits: BodyLimits) -> list[RawImage]:
    """The images a request body carries, in order; a wrong body raises :class:`RequestError`."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body is {len(body):,} bytes, over the limit of {limits.max_body_bytes:,}")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not media:
        raise RequestError(415, f"missing Content-Type: send one of {', '.join(SUPPORTED_CONTENT_TYPES)}")
    if not body:
        raise RequestError(400, "empty request body: send an image")
    if media.startswith("image/"):
        images = [RawImage("body", body)]
    elif media == "multipart/form-data":
        images = _multipart(content_type or "", body)
    elif media == "application/json":
        images = _json_images(body)
    else:
        raise RequestError(
            415, f"unsupported Content-Type {media!r}: send one of {', '.join(SUPPORTED_CONTENT_TYPES)}"
        )
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images in one request, over the limit of {limits.max_images}")
    return images


_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.HTTP)


def _header_fields(block: bytes, where: str) -> tuple[str | None, str, str | None]:
    """(filename, content type, boundary) of a header block; the stdlib parser's many errors become a 400."""
    try:
        headers = _HEADERS.parsebytes(block + b"\r\n")
        boundary = headers.get_param("boundary")
        return headers.get_filename(), headers.get_content_type(), boundary if isinstance(boundary, str) else None
    except Exception as exc:  # noqa: BLE001 - IndexError, ValueError, ... on hostile header text
        raise RequestError(400, f"malformed multipart body: unreadable headers in {where}: {exc!r:.80}") from None


def _multipart(content_type: str, body: bytes) -> list[RawImage]:
    """File parts of a multipart/form-data body (RFC 7578), found with bytes.find: fast and byte-exact."""
    value = _header_fields(f"Content-Type: {content_type}\r\n".encode("latin-1", "replace"), "the Content-Type")[2]
    if not value or len(value) > 200:
        raise RequestError(400, "malformed multipart body: the Content-Type has no boundary parameter")
    delimiter = b"--" + value.encode("latin-1", "replace")
    first = body.find(delimiter)
    if first < 0 or (first > 0 and body[first - 2 : first] != b"\r\n"):
        raise RequestError(400, "malformed multipart body: the opening boundary is missing")
    images: list[RawImage] = []
    pos, index = first + len(delimiter), 0
    while not body.startswith(b"--", pos):
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise RequestError(400, "malformed multipart body: a boundary line is not followed by CRLF")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise RequestError(400, "malformed multipart body: the closing boundary is missing (body cut short?)")
        part = body[start:end]
        split = 0 if part.startswith(b"\r\n") else part.find(b"\r\n\r\n") + 2
        if split < 2 and not part.startswith(b"\r\n"):
            raise RequestError(400, f"malformed multipart body: part {index} has no blank line after its headers")
        filename, part_type, _ = _header_fields(part[:split], f"part {index}")
        content = part[split + 2 :]
        if filename is not None or part_type.startswith("image/"):
            images.append(RawImage(filename or f"part[{index}]", content))
        pos, index = end + 2 + len(delimiter), index + 1
    if not images:
        raise RequestError(400, "multipart body holds no file parts: upload one or more image files")
    return images


def _json_images(body: bytes) -> list[RawImage]:
    try:
        data: Any = json.loads(body)
    except RecursionError:
        raise RequestError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise RequestError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict) or "images" not in data:
        raise RequestError(400, 'JSON body must be an object {"images": ["<base64>", ...]}')
    unknown = sorted(set(data) - {"images"})
    if unknown:
        raise RequestError(400, f"unknown JSON field(s) {', '.join(unknown)}: the body holds only 'images'")
    items = data["images"]
    if not isinstance(items, list) or not items:
        raise RequestError(400, "JSON field 'images' must be a non-empty list of base64 strings")
    return [RawImage(f"images[{i}]", _b64(item, f"images[{i}]")) for i, item in enumerate(items)]


def _b64(item: Any, name: str) -> bytes:
    if not isinstance(item, str):
        raise RequestError(400, f"{name} must be a base64 string, got {type(item).__name__}")
    text = item.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, f"{name}: a data URL must be 'data:<type>;base64,<data>'")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"{name} is not valid base64: {exc}") from None


def decode_image(image: RawImage, max_side: int | None, max_pixels: int) -> np.ndarray:
    """HWC uint8 RGB pixels of one image; an empty, foreign, corrupt or oversized one raises."""
    decoded = decode(image.payload, max_side or sys.maxsize, max_pixels)
    if decoded.status == "ok" and decoded.pixels is not None:
        pixels = np.frombuffer(decoded.pixels, np.uint8).reshape(decoded.height, decoded.width, 3)
        return pixels.copy()  # writable: torch warns on read-only buffers
    if decoded.status == REASON_OVERSIZED:
        detail = decoded.detail.replace("data.max_image_pixels", "max_pixels")
        raise RequestError(422, f"{image.name}: image too large: {detail}")
    if decoded.status == REASON_EMPTY:
        raise RequestError(400, f"{image.name}: empty image (0 bytes)")
    raise RequestError(422, f"{image.name}: cannot decode the image ({decoded.status}): {decoded.detail}")

