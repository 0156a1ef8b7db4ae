"""Image preprocessing: the evaluation path that travels with the weights.

Evaluation resizes the short side to ``input_size / crop_pct`` with the backbone's interpolation, crops the
centre ``input_size`` square and normalises with the backbone's mean and std: exactly what the weights were
trained with. Training, the predictor and serving all build this from the same :class:`Preprocessing`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from automl_tl.backbones import BackboneSpec

__all__ = ["Preprocessing", "eval_transform", "to_tensor_batch"]

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images become input tensors for one backbone at one image size."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @classmethod
    def from_spec(cls, spec: BackboneSpec, image_size: int | None = None) -> Preprocessing:
        return cls(image_size or spec.input_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            int(data["input_size"]),
            tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            str(data["interpolation"]),
            float(data["crop_pct"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    @property
    def resize_side(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))


def eval_transform(pre: Preprocessing) -> T.Compose:
    """PIL image or HWC uint8 array -> normalised CHW float tensor."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(pre.resize_side, interpolation=_INTERPOLATION[pre.interpolation], antialias=True),
            T.CenterCrop(pre.input_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(pre.mean), list(pre.std)),
        ]
    )


def to_tensor_batch(images: list[Image.Image | np.ndarray], pre: Preprocessing) -> torch.Tensor:
    """A list of RGB images as one normalised NCHW batch."""
    transform = eval_transform(pre)
    return torch.stack([transform(img) for img in images])
