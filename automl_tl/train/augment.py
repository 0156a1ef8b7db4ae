"""Training-time augmentation policies, from "none" to "heavy".

* ``none``:   the evaluation transform itself (:func:`~automl_tl.inference.transforms.eval_transform`'s
              object, so validation scores trials exactly as inference preprocesses); deterministic, so a
              fully frozen backbone's features can be computed once and cached.
* ``light``:  random resized crop + horizontal flip.
* ``medium``: light + TrivialAugment (one random photometric/geometric op per image, no magnitudes to tune).
* ``heavy``:  medium + MixUp or CutMix on each batch (soft targets).

Inputs are the cache's HWC uint8 arrays; outputs are normalised CHW float tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from automl_tl.config import AUGMENTATIONS
from automl_tl.errors import ConfigError
from automl_tl.inference.transforms import Preprocessing, eval_transform

__all__ = ["AUGMENTATIONS", "train_transform", "batch_mixer", "is_deterministic", "array_to_tensor"]

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def array_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> CHW uint8 tensor (cache views are read-only, so those are copied: a few KB)."""
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, copy=True, order="C")
    return torch.from_numpy(image).permute(2, 0, 1)


def is_deterministic(policy: str) -> bool:
    """Whether the policy's per-sample transform is fixed (then frozen features can be cached)."""
    return policy == "none"


def train_transform(policy: str, pre: Preprocessing) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-sample transform of an augmentation policy (CHW uint8 tensor in, float tensor out)."""
    if policy not in AUGMENTATIONS:
        raise ConfigError(f"augmentation: must be one of {', '.join(AUGMENTATIONS)}, got {policy!r}")
    if policy == "none":
        return eval_transform(pre)
    interp = _INTERPOLATION[pre.interpolation]
    steps: list[Callable[..., object]] = [
        T.RandomResizedCrop(pre.input_size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if policy in ("medium", "heavy"):
        steps.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(list(pre.mean), list(pre.std))]
    return T.Compose([*steps, *finish])


def batch_mixer(policy: str, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """For ``heavy``: MixUp or CutMix on a batch, returning images and soft targets; else None."""
    if policy != "heavy":
        return None
    mixer = T.RandomChoice([T.MixUp(alpha=0.2, num_classes=num_classes), T.CutMix(alpha=1.0, num_classes=num_classes)])

    def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_images, out_targets = mixer(images, labels)
        return out_images, out_targets

    return mix
