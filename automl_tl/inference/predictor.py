"""Predicting with a saved artifact: plain torch, no Ray.

    from automl_tl.inference.predictor import Predictor
    predictor = Predictor.load("runs/my_run/artifact")
    predictor.predict(["ant.jpg", pil_image, uint8_array], top_k=2)   # -> [Prediction(labels, probabilities)]

Each member gets its images preprocessed exactly as in training's evaluation path (``eval_transform`` from
the :class:`~automl_tl.inference.transforms.Preprocessing` stored in the manifest), so members with different input
sizes are each fed their own batch. Member probabilities are averaged with the ensemble weights and then
calibrated with the ensemble temperature. Files are decoded like the data set decodes them (upright per EXIF,
transparency onto white, shrunk to the manifest's ``decode.max_side`` when it has one).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from automl_tl.inference.artifact import Artifact, load_artifact
from automl_tl.backbones import memory_format_for, ready_for_inference
from automl_tl.evaluate.ensemble import apply_temperature, combine
from automl_tl.errors import DatasetError
from automl_tl.inference.transforms import Preprocessing, eval_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageInput",
    "Prediction",
    "Predictor",
    "expand_image_paths",
    "load_image",
    "match_class_names",
    "top_predictions",
]

ImageInput = Image.Image | np.ndarray | str | os.PathLike[str]
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_WHITE = (255, 255, 255)
_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit, also the data set's default


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top classes of one image, most probable first, with their calibrated probabilities."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "probabilities": list(self.probabilities)}


def top_predictions(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[Prediction]:
    """Per row of ``probs``: the ``k`` most probable classes (at most all of them; ties in class order)."""
    k = min(k, len(class_names))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        Prediction(tuple(class_names[j] for j in row), tuple(float(p[j]) for j in row)) for p, row in zip(probs, order)
    ]


# --- images -----------------------------------------------------------------------------------------------


def _flatten_alpha(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def _shrink(arr: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink so the longer side is at most ``max_side``, as the data set's cache does (Lanczos)."""
    height, width = arr.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return arr
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))


def _decode_file(path: Path, max_side: int | None) -> np.ndarray:
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if max_side is not None:
        try:  # the data set's own decoder, so a file gives exactly the pixels it gave in training
            from automl_tl.data._decode import decode
        except ImportError:
            pass
        else:
            decoded = decode(payload, max_side, _MAX_PIXELS)
            if decoded.status != "ok" or decoded.pixels is None:
                raise DatasetError(f"cannot use image {path}: {decoded.status}: {decoded.detail}")
            return np.frombuffer(decoded.pixels, np.uint8).reshape(decoded.height, decoded.width, 3)
    try:
        with Image.open(io.BytesIO(payload)) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            return _shrink(np.asarray(_flatten_alpha(upright)), max_side)
    except Exception as exc:  # Pillow raises many types for a bad file
        raise DatasetError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def load_image(item: ImageInput, max_side: int | None = None) -> np.ndarray:
    """One input as an HWC uint8 RGB array: a file path, a PIL image or a uint8 array (HW, HWC with 1/3/4)."""
    arr = _as_rgb_array(item, max_side)
    return arr if arr.flags.writeable else arr.copy()  # torch warns on read-only buffers


def _as_rgb_array(item: ImageInput, max_side: int | None) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        return _decode_file(Path(item), max_side)
    if isinstance(item, Image.Image):
        return _shrink(np.asarray(_flatten_alpha(item)), max_side)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise DatasetError(f"image arrays must be uint8 (0-255), got dtype {item.dtype} of shape {item.shape}")
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[:, :, 0]
        if item.ndim == 2:
            item = np.repeat(item[:, :, None], 3, axis=2)
        elif item.ndim == 3 and item.shape[2] == 4:
            item = np.asarray(_flatten_alpha(Image.fromarray(item)))
        elif item.ndim != 3 or item.shape[2] != 3:
            raise DatasetError(f"image arrays must be HxW or HxWx1/3/4, got shape {item.shape}")
        return _shrink(np.ascontiguousarray(item), max_side)
    raise DatasetError(f"cannot predict on a {type(item).__name__}: pass a file path, a PIL image or a uint8 array")


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


def _chunks(items: Iterable[ImageInput], size: int) -> Iterator[list[ImageInput]]:
    """Consecutive lists of ``size`` items; a generator is read lazily, one chunk in memory at a time."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def match_class_names(artifact_names: Sequence[str], data_names: Sequence[str], data: str) -> np.ndarray:
    """For each class index of the data, the artifact's index of that class; a different set of classes raises.

    The order may differ (it is remapped); the names must be the same set.
    """
    missing = [c for c in artifact_names if c not in data_names]
    unknown = [c for c in data_names if c not in artifact_names]
    if missing or unknown:
        parts = []
        if unknown:
            parts.append(f"classes unknown to the artifact: {', '.join(unknown)}")
        if missing:
            parts.append(f"artifact classes absent from the data: {', '.join(missing)}")
        raise DatasetError(
            f"{data}: class names do not match the artifact's ({', '.join(artifact_names)}); {'; '.join(parts)}"
        )
    return np.array([list(artifact_names).index(c) for c in data_names], dtype=np.int64)


# --- the predictor ----------------------------------------------------------------------------------------


class Predictor:
    """An artifact's members in eval mode, their preprocessing, and how their outputs combine."""

    def __init__(
        self, artifact: Artifact, models: Sequence[torch.nn.Module], device: str | torch.device = "cpu"
    ) -> None:
        if len(models) != len(artifact.members):
            raise ValueError(f"{len(models)} models for {len(artifact.members)} artifact members")
        self.artifact = artifact
        self.device = torch.device(device)
        self._format = memory_format_for(self.device)
        self.preprocessing = tuple(Preprocessing.from_dict(m.preprocessing) for m in artifact.members)
        # batch norms folded; on CPU a frozen graph, as each Serve replica runs it
        self.models = [ready_for_inference(m, self.device, p.input_size) for m, p in zip(models, self.preprocessing)]
        # One transform (and one batch) per distinct preprocessing, shared by members that use it.
        self._transforms = {pre: eval_transform(pre) for pre in self.preprocessing}

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Predictor:
        """Load and verify the artifact at ``path`` and rebuild its members (no pretrained files needed)."""
        artifact = load_artifact(path)
        return cls(artifact, artifact.build_models(), device)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.artifact.class_names

    def _member_indices(self, member: str | None) -> list[int]:
        return list(range(len(self.models))) if member is None else [self.artifact.member_index(member)]

    def preprocess(self, images: Sequence[ImageInput], member: str | None = None) -> list[torch.Tensor]:
        """One normalised NCHW batch per member (``member`` alone if given), in member order."""
        arrays = [load_image(img, self.artifact.decode_max_side) for img in images]
        batches: dict[Preprocessing, torch.Tensor] = {}
        out = []
        for i in self._member_indices(member):
            pre = self.preprocessing[i]
            if pre not in batches:
                transform = self._transforms[pre]
                batches[pre] = torch.stack([transform(a) for a in arrays])
            out.append(batches[pre])
        return out

    @torch.inference_mode()
    def member_probabilities(self, batches: Sequence[torch.Tensor], member: str | None = None) -> list[np.ndarray]:
        """Each member's uncalibrated softmax on its own preprocessed batch (as :meth:`preprocess` returns)."""
        indices = self._member_indices(member)
        if len(batches) != len(indices):
            raise ValueError(f"need {len(indices)} preprocessed batches (one per member), got {len(batches)}")
        out = []
        for i, batch in zip(indices, batches):
            logits = self.models[i](batch.to(self.device, memory_format=self._format)).double()
            out.append(torch.softmax(logits, dim=1).cpu().numpy())
        return out

    def proba_from_preprocessed(self, batches: Sequence[torch.Tensor], member: str | None = None) -> np.ndarray:
        """Calibrated probabilities (N, C) from preprocessed batches: the serving path without decoding."""
        probs = self.member_probabilities(batches, member)
        if member is not None:
            return apply_temperature(probs[0], self.artifact.members[self._member_indices(member)[0]].temperature)
        return apply_temperature(combine(probs, self.artifact.weights), self.artifact.temperature)

    def predict_proba(
        self, images: Iterable[ImageInput], batch_size: int = 32, member: str | None = None
    ) -> np.ndarray:
        """Calibrated ensemble probabilities (N, C) in ``class_names`` order; ``member`` uses that one alone.

        ``images`` may be a generator: only ``batch_size`` images are decoded at a time.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        parts = [
            self.proba_from_preprocessed(self.preprocess(chunk, member), member)
            for chunk in _chunks(images, batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)))

    def predict(
        self, images: Iterable[ImageInput], top_k: int = 5, batch_size: int = 32, member: str | None = None
    ) -> list[Prediction]:
        """The ``top_k`` most probable classes of each image (at most the number of classes)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return top_predictions(self.predict_proba(images, batch_size, member), self.class_names, top_k)
