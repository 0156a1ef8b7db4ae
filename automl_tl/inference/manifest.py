"""What ``manifest.json`` of an artifact must hold, as pydantic models: loading checks it against them.

:func:`read_manifest` parses the JSON and reports every mistake at once in an
:class:`~automl_tl.errors.ArtifactError` that names the file and each dotted field
(``members[0].sha256: must be 64 hex digits, got 'abc'``). An unknown ``format`` or ``format_version`` is
refused before any field is read. Keys a member or the manifest holds beyond these are left alone.

    .venv/bin/python -m pytest -q tests/test_artifact.py -k manifest
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from automl_tl.errors import ArtifactError

__all__ = ["FORMAT_TAG", "FORMAT_VERSION", "Manifest", "MemberEntry", "read_manifest"]

FORMAT_VERSION = 1
FORMAT_TAG = "automl_tl.artifact"  # the on-disk format name, kept across module moves

Number = Annotated[float, Strict()]  # an int or a float, never true/false or text


class _Preprocessing(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    input_size: Annotated[int, Strict()]
    mean: list[Number]
    std: list[Number]
    interpolation: str
    crop_pct: Number

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, values: list[float]) -> list[float]:
        if len(values) != 3:
            raise ValueError(f"must hold 3 numbers (one per channel), got {values!r:.80}")
        return values


class MemberEntry(BaseModel):
    """One member as the manifest lists it (keys this version does not know are left alone)."""

    model_config = ConfigDict(frozen=True)

    member_id: str
    backbone: str
    spec: dict[str, Any]
    head: str
    head_dropout: Number
    num_classes: Annotated[int, Strict()]
    image_size: Annotated[int, Strict()]
    preprocessing: _Preprocessing
    weight_file: str
    sha256: str
    val_metrics: dict[str, Any] | None = None
    temperature: Number = 1.0
    hyperparameters: dict[str, Any] | None = None
    tta: tuple[Literal["hflip"], ...] = ()  # test-time views averaged over (inference.transforms.TTA_VIEWS)
    latency_ms: dict[str, Annotated[Number, Field(ge=0, allow_inf_nan=False)]] | None = None  # by batch size

    @field_validator("weight_file")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or Path(name).name != name or name[0] == ".":
            raise ValueError(f"must be a plain file name inside the artifact, got {name!r}")
        return name

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"must be 64 hex digits, got {digest!r:.80}")
        return digest

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value: float) -> float:
        return _positive_finite(value)

    @model_validator(mode="after")
    def _sizes_agree(self) -> MemberEntry:
        if self.image_size != self.preprocessing.input_size:
            raise ValueError(
                f"image_size {self.image_size} differs from preprocessing.input_size {self.preprocessing.input_size}"
            )
        return self


class _Ensemble(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: str | None = None
    weights: list[Annotated[Number, Field(ge=0, allow_inf_nan=False)]]
    temperature: Number

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value: float) -> float:
        return _positive_finite(value)


class _Cascade(BaseModel):
    """The cheap member that answers alone when its calibrated confidence reaches ``threshold``; the keys
    beyond these (how the threshold was chosen, what it scored) are kept as written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    member_id: str
    threshold: Annotated[Number, Field(ge=0, le=1)]


class _Decode(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_side: Annotated[int, Strict(), Field(ge=1)] | None = None  # files are shrunk to this longer side


class Manifest(BaseModel):
    """``manifest.json`` as :func:`write_artifact` writes it; loading checks it against this model."""

    model_config = ConfigDict(frozen=True)

    format: str
    format_version: int
    class_names: list[str] = Field(min_length=1)
    members: list[MemberEntry] = Field(min_length=1)
    ensemble: _Ensemble
    decode: _Decode | None = None
    cascade: _Cascade | None = None
    metrics: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_format(cls, raw: Any) -> Any:
        """A manifest of another format or version is refused before its fields are read."""
        if not isinstance(raw, Mapping):
            raise ValueError("expected a JSON object at the top level")
        if raw.get("format") != FORMAT_TAG:
            raise ValueError(f"field 'format' must be {FORMAT_TAG!r}, got {raw.get('format')!r:.80}")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"unknown format version {raw.get('format_version')!r}; this automl_tl reads version {FORMAT_VERSION}"
            )
        return raw

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"must be distinct, got {names!r:.80}")
        return names

    @model_validator(mode="after")
    def _members_agree(self) -> Manifest:
        problems = [
            f"members[{i}]: class-count mismatch: num_classes is {m.num_classes}, but class_names lists "
            f"{len(self.class_names)}"
            for i, m in enumerate(self.members)
            if m.num_classes != len(self.class_names)
        ]
        ids = [m.member_id for m in self.members]
        if len(set(ids)) != len(ids):
            problems.append("member ids are not unique")
        weights = self.ensemble.weights
        if len(weights) != len(self.members):
            problems.append(
                f"ensemble.weights must hold {len(self.members)} numbers >= 0 (one per member), got {weights!r:.80}"
            )
        elif sum(weights) <= 0:
            problems.append("ensemble.weights sum to 0")
        if self.cascade is not None and self.cascade.member_id not in ids:
            problems.append(f"cascade.member_id {self.cascade.member_id!r} is not a member; members: {', '.join(ids)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _positive_finite(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be positive and finite, got {value}")
    return value


def read_manifest(data: bytes, where: str) -> Manifest:
    """The manifest in ``data`` (read from ``where``), checked: every mistake is named in one ArtifactError."""
    from automl_tl.config import describe_validation_error

    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{where}: not valid JSON: {exc}") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(describe_validation_error(exc, where, Manifest)) from None
