"""Image preprocessing: the evaluation path that travels with the weights.

Evaluation resizes the short side to ``input_size / crop_pct`` with the backbone's interpolation, crops the
centre ``input_size`` square and normalises with the backbone's mean and std: exactly what the weights were
trained with. One :class:`EvalTransform` object per :class:`Preprocessing` (:func:`eval_transform`) serves
sweep validation, the frozen-feature cache, the predictor, test scoring and serving alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from automl_tl.backbones import BackboneSpec

__all__ = ["TTA_VIEWS", "EvalTransform", "Preprocessing", "TestTimeAugmented", "eval_transform", "to_tensor_batch",
           "with_test_time_augmentation"]  # fmt: skip

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


@functools.cache
def eval_transform(pre: Preprocessing) -> EvalTransform:
    """The one evaluation transform of ``pre`` (the same object on every call): an image in, a normalised CHW
    float tensor out."""
    return EvalTransform(pre)


class EvalTransform:
    """Resize the short side, crop the centre, scale to [0, 1], normalise: torchvision's v2 pipeline
    (``ToImage``, ``Resize`` with antialias, ``CenterCrop``, ``ToDtype``, ``Normalize``), step for step, called
    as its kernels on a plain tensor, which skips the pipeline's dispatch and wrapping on a served request's
    critical path. The pixels are the same bit for bit (``tests/test_transforms.py``).

    Takes a PIL image, an HWC uint8 array, or a CHW uint8 tensor (how training reads the image cache).
    """

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        self._interpolation = _INTERPOLATION[pre.interpolation]
        self._mean, self._std = list(pre.mean), list(pre.std)

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError(f"a tensor image must be CHW uint8 with 3 channels, got {image.dtype} {tuple(image.shape)}")
            chw = image
        else:
            pixels = np.array(image) if isinstance(image, Image.Image) else np.atleast_3d(image)
            if not pixels.flags.writeable:
                pixels = pixels.copy()  # torch refuses to wrap a read-only buffer without a warning
            # HWC viewed as CHW, not copied: resize reads this channels-last layout faster, and to the same bits.
            chw = torch.from_numpy(pixels).permute(2, 0, 1)
        chw = F.resize_image(chw, [self.pre.resize_side], interpolation=self._interpolation, antialias=True)
        chw = F.center_crop_image(chw, [self.pre.input_size, self.pre.input_size]).contiguous()  # as before
        scaled = F.to_dtype_image(chw, torch.float32, scale=True)
        return F.normalize_image(scaled, self._mean, self._std, inplace=True)


def to_tensor_batch(images: list[Image.Image | np.ndarray], pre: Preprocessing) -> torch.Tensor:
    """A list of RGB images as one normalised NCHW batch."""
    transform = eval_transform(pre)
    return torch.stack([transform(img) for img in images])


# Test-time augmentation: the views of an input a member also predicts, its softmax averaged over them.
# Chosen per member on cross-validated predictions (``automl_tl.evaluate.crossval``), kept in the manifest.
TTA_VIEWS: tuple[str, ...] = ("hflip",)


class TestTimeAugmented(torch.nn.Module):
    """A member whose output is the log of its softmax averaged over the input and its views: every path that
    takes a softmax of a member's output (predictor, Serve, export, test scoring) gets the averaged one."""

    def __init__(self, model: torch.nn.Module, views: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.views = model, tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(x), dim=1)
        for _ in self.views:  # each is "hflip" (TTA_VIEWS): the image mirrored left to right
            probs = probs + torch.softmax(self.model(torch.flip(x, dims=(3,))), dim=1)
        return torch.log((probs / (1 + len(self.views))).clamp_min(1e-12))


def with_test_time_augmentation(model: torch.nn.Module, views: tuple[str, ...] | list[str]) -> torch.nn.Module:
    """``model`` itself without views, else wrapped to average over them; an unknown view is refused."""
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise ValueError(f"test-time augmentation {unknown[0]!r} is not one of {', '.join(TTA_VIEWS)}")
    return TestTimeAugmented(model, tuple(views)) if views else model
