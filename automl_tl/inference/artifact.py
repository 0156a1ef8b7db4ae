"""The saved model: ``RUN_DIR/artifact/`` with ``manifest.json`` and one safetensors file per member.

The manifest says everything needed to rebuild and feed each member (backbone, head, preprocessing), how
the members combine (weights, temperature), what they scored, and with which versions they were made.
Every weight file is listed with its sha256. Loading never unpickles: weights are safetensors, the manifest
is JSON, and a missing or tampered file, an unknown format version or a class-count mismatch is an
:class:`~automl_tl.errors.ArtifactError` naming the file and the field.

All file access goes through :class:`LocalStore` (read/write/exists of one named file), so another store
(an S3 bucket through a pyarrow filesystem) only has to provide those three methods.

    .venv/bin/python -m pytest -q tests/test_artifact.py
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from automl_tl.errors import ArtifactError, AutoMLError
from automl_tl.inference.manifest import FORMAT_TAG as _FORMAT_TAG
from automl_tl.inference.manifest import FORMAT_VERSION, MemberEntry, read_manifest
from automl_tl.inference.store import ArtifactStore, LocalStore, refuse_files_outside
from automl_tl.runs.locate import MANIFEST_NAME

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Artifact",
    "ArtifactStore",
    "LocalStore",
    "MemberRecord",
    "load_artifact",
    "member_from_trial",
    "write_artifact",
]

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclasses.dataclass(frozen=True)
class MemberRecord:
    """One ensemble member: how to rebuild it, how to feed it, where its weights are and what it scored.

    ``weight_file`` and ``sha256`` are filled in by :func:`write_artifact`. ``temperature`` calibrates this
    member alone (used when it is predicted or exported on its own); the ensemble has its own.
    """

    member_id: str
    backbone: str
    spec: Mapping[str, Any]
    head: str
    head_dropout: float
    num_classes: int
    image_size: int
    preprocessing: Mapping[str, Any]
    weight_file: str = ""
    sha256: str = ""
    val_metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0
    hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tta: tuple[str, ...] = ()  # test-time views its softmax is averaged over (inference.transforms.TTA_VIEWS)
    latency_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)  # measured forward, by batch size

    @classmethod
    def create(
        cls,
        member_id: str,
        backbone: str,
        num_classes: int,
        head: str = "linear",
        head_dropout: float = 0.0,
        image_size: int | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        val_metrics: Mapping[str, Any] | None = None,
        temperature: float = 1.0,
        hyperparameters: Mapping[str, Any] | None = None,
    ) -> MemberRecord:
        """A record whose spec comes from the registry and whose preprocessing defaults to the spec's."""
        from automl_tl.backbones import resolve_spec
        from automl_tl.inference.transforms import Preprocessing

        spec = resolve_spec(backbone)
        pre = dict(preprocessing) if preprocessing is not None else Preprocessing.from_spec(spec, image_size).to_dict()
        return cls(
            member_id=member_id,
            backbone=backbone,
            spec=spec.to_dict(),
            head=head,
            head_dropout=float(head_dropout),
            num_classes=int(num_classes),
            image_size=int(pre["input_size"]),
            preprocessing=pre,
            val_metrics=dict(val_metrics or {}),
            temperature=float(temperature),
            hyperparameters=dict(hyperparameters or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


_STRUCTURE_KEYS = frozenset(
    {"backbone", "head", "head_dropout", "num_classes", "class_names", "preprocessing", "spec", "val_metrics"}
)


def member_from_trial(
    trial_dir: str | os.PathLike[str], member_id: str | None = None
) -> tuple[MemberRecord, dict[str, torch.Tensor]]:
    """A finished trial (``trial.json`` + ``model.safetensors``) as a member record and its state dict.

    The record's id is ``member_id`` or the folder name; hyperparameters are the rest of ``trial.json``.
    """
    from safetensors.torch import load_file

    folder = Path(trial_dir)
    info_path, weights_path = folder / "trial.json", folder / "model.safetensors"
    for path in (info_path, weights_path):
        if not path.is_file():
            raise ArtifactError(f"trial {folder.name}: {path} is missing")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{info_path}: not valid JSON: {exc}") from None
    if not isinstance(info, Mapping):
        raise ArtifactError(f"{info_path}: expected a JSON object")
    for key in ("backbone", "num_classes", "preprocessing"):
        if key not in info:
            raise ArtifactError(f"{info_path}: missing field '{key}'")
    record = MemberRecord.create(
        member_id or folder.name,
        str(info["backbone"]),
        int(info["num_classes"]),
        head=str(info.get("head", "linear")),
        head_dropout=float(info.get("head_dropout", 0.0)),
        preprocessing=info["preprocessing"],
        val_metrics=info.get("val_metrics") or {},
        hyperparameters={k: v for k, v in info.items() if k not in _STRUCTURE_KEYS},
    )
    if isinstance(info.get("spec"), Mapping):
        record = dataclasses.replace(record, spec=dict(info["spec"]))  # the spec the trial trained with
    try:
        state = dict(load_file(str(weights_path)))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ArtifactError(f"{weights_path}: not a safetensors file: {exc}") from None
    return record, state


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _versions() -> dict[str, str]:
    import importlib.metadata

    import safetensors
    import timm

    try:
        own = importlib.metadata.version("automl_tl")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        own = "unknown"
    return {
        "automl_tl": own,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }


def _tensor_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return bytes(save(tensors, metadata=metadata))


def write_artifact(
    out_dir: Path,
    class_names: Sequence[str],
    members: Sequence[tuple[MemberRecord, Mapping[str, torch.Tensor]]],
    weights: Sequence[float],
    temperature: float,
    metrics: Mapping[str, Any] | None = None,
    method: str | None = None,
    decode_max_side: int | None = None,
    overwrite: bool = True,
    store: ArtifactStore | None = None,
    cascade: Mapping[str, Any] | None = None,
) -> Path:
    """Write members' state dicts (TransferNet keys, ``net.``...) and the manifest; return the manifest path.

    ``weights`` are the ensemble weights (normalised to sum to 1), ``temperature`` the ensemble's.
    ``decode_max_side`` is the data set's ``cache_max_side``: training saw images shrunk to it, so the
    predictor shrinks files the same way. ``cascade`` names the cheap member (``member_id``) and its
    confidence ``threshold`` for ``mode="cascade"``. The manifest is written last, so a folder with one is complete.
    """
    out_dir = Path(out_dir)
    store = store or LocalStore(out_dir)
    names = [str(n) for n in class_names]
    if not members:
        raise ArtifactError(f"{out_dir}: an artifact needs at least one member")
    if len(set(names)) != len(names) or not names:
        raise ArtifactError(f"{out_dir}: class names must be distinct and non-empty, got {names}")
    if len(weights) != len(members):
        raise ArtifactError(f"{out_dir}: {len(weights)} ensemble weights for {len(members)} members")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ArtifactError(f"{out_dir}: ensemble weights must be >= 0 with a positive sum, got {w}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ArtifactError(f"{out_dir}: temperature must be positive and finite, got {temperature}")
    if decode_max_side is not None and (isinstance(decode_max_side, bool) or decode_max_side < 1):
        raise ArtifactError(f"{out_dir}: decode_max_side must be a positive integer or None, got {decode_max_side!r}")
    if store.exists(MANIFEST_NAME) and not overwrite:
        raise ArtifactError(f"{store.describe(MANIFEST_NAME)} already exists")

    records: list[dict[str, Any]] = []
    for index, (record, state) in enumerate(members):
        if record.num_classes != len(names):
            raise ArtifactError(
                f"member {record.member_id}: num_classes is {record.num_classes}, but there are {len(names)} "
                "class names"
            )
        if record.member_id in {r["member_id"] for r in records}:
            raise ArtifactError(f"member id {record.member_id!r} appears twice")
        file_name = f"member-{index:02d}-{_SAFE_NAME.sub('_', record.member_id)[:64]}.safetensors"
        data = _tensor_bytes(state, {"format": _FORMAT_TAG, "member_id": record.member_id})
        store.write_bytes(file_name, data)
        done = dataclasses.replace(record, weight_file=file_name, sha256=hashlib.sha256(data).hexdigest())
        records.append(done.to_dict())

    manifest = {
        "format": _FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": names,
        "members": records,
        "ensemble": {"method": method, "weights": [x / sum(w) for x in w], "temperature": float(temperature)},
        "decode": {"max_side": decode_max_side},
        **({"cascade": _plain(dict(cascade))} if cascade else {}),
        "metrics": _plain(dict(metrics or {})),
        "versions": _versions(),
    }
    data = json.dumps(manifest, indent=2, allow_nan=False).encode("utf-8")
    read_manifest(data, store.describe(MANIFEST_NAME))  # what could not be loaded back is never written
    store.write_bytes(MANIFEST_NAME, data)
    return out_dir / MANIFEST_NAME


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact. Weight files are re-read and re-verified each time they are used."""

    path: Path
    class_names: tuple[str, ...]
    members: tuple[MemberRecord, ...]
    weights: tuple[float, ...]
    temperature: float
    method: str | None
    metrics: Mapping[str, Any]
    versions: Mapping[str, str]
    store: ArtifactStore
    decode_max_side: int | None = None  # files are shrunk to this longer side before preprocessing
    cascade: Mapping[str, Any] | None = None  # the cheap member and its threshold (see write_artifact)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def member_index(self, member_id: str) -> int:
        for i, m in enumerate(self.members):
            if m.member_id == member_id:
                return i
        raise ArtifactError(
            f"{self.path}: no member {member_id!r}; members: {', '.join(m.member_id for m in self.members)}"
        )

    def verified_bytes(self, index: int) -> bytes:
        """The bytes of member ``index``'s weight file, after checking them against the manifest's sha256."""
        member = self.members[index]
        data = self.store.read_bytes(member.weight_file)
        got = hashlib.sha256(data).hexdigest()
        if got != member.sha256:
            raise ArtifactError(
                f"{self.store.describe(member.weight_file)}: sha256 mismatch for member {member.member_id} "
                f"(manifest {member.sha256[:12]}..., file {got[:12]}...): the file was changed or corrupted"
            )
        return data

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s weights, parsed only after their sha256 matched the manifest."""
        from safetensors.torch import load

        member = self.members[index]
        data = self.verified_bytes(index)
        try:
            return dict(load(data))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ArtifactError(f"{self.store.describe(member.weight_file)}: not a safetensors file: {exc}") from None

    def build_model(self, index: int) -> torch.nn.Module:
        """Member ``index`` rebuilt with ``create_backbone(pretrained=False)``, its weights loaded, in eval mode."""
        from automl_tl.backbones import create_backbone, resolve_spec

        member = self.members[index]
        where = f"{self.path}: member {member.member_id}"
        try:
            spec = resolve_spec(member.backbone)
            saved = member.spec
            for field in ("architecture", "feature_width", "timm_kwargs"):
                now = _plain(spec.to_dict()[field])
                if field in saved and _plain(saved[field]) != now:
                    raise ArtifactError(
                        f"{where}: backbone {member.backbone} was saved with {field}={saved[field]!r}, but this "
                        f"installation builds it with {now!r}"
                    )
            model = create_backbone(
                member.backbone,
                num_classes=member.num_classes,
                pretrained=False,
                head=member.head,
                head_dropout=member.head_dropout,
                image_size=member.image_size,
            )
        except ArtifactError:
            raise
        except AutoMLError as exc:
            raise ArtifactError(f"{where}: cannot rebuild the backbone: {exc}") from None
        state = self.state_dict(index)
        if state and not any(k.startswith("net.") for k in state):
            state = {f"net.{k}": v for k, v in state.items()}  # a bare timm state dict
        for key, want in model.state_dict().items():  # module order: a head's weight comes before its bias
            tensor = state.get(key)
            if tensor is not None and want.ndim and want.shape != tensor.shape and want.shape[0] == member.num_classes:
                raise ArtifactError(
                    f"{self.store.describe(member.weight_file)}: class-count mismatch: {key} holds "
                    f"{tensor.shape[0]} outputs, but the manifest lists {member.num_classes} classes"
                )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise ArtifactError(
                f"{self.store.describe(member.weight_file)}: weights do not fit {member.backbone} with a "
                f"{member.head} head of {member.num_classes} classes: {' '.join(lines[1:3])[:300]}"
            ) from None
        from automl_tl.inference.transforms import with_test_time_augmentation

        return with_test_time_augmentation(model.eval(), member.tta).eval()

    def build_models(self) -> list[torch.nn.Module]:
        return [self.build_model(i) for i in range(len(self.members))]


# --- reading the manifest (checked by automl_tl.inference.manifest) ------------------------------------------


def _record(entry: MemberEntry) -> MemberRecord:
    return MemberRecord(
        member_id=entry.member_id,
        backbone=entry.backbone,
        spec=entry.spec,
        head=entry.head,
        head_dropout=entry.head_dropout,
        num_classes=entry.num_classes,
        image_size=entry.image_size,
        preprocessing=entry.preprocessing.model_dump(),
        weight_file=entry.weight_file,
        sha256=entry.sha256,
        val_metrics=entry.val_metrics or {},
        temperature=entry.temperature,
        hyperparameters=entry.hyperparameters or {},
        tta=tuple(entry.tta),
        latency_ms=entry.latency_ms or {},
    )


def load_artifact(path: str | os.PathLike[str], store: ArtifactStore | None = None) -> Artifact:
    """Read ``path`` (the artifact folder, its manifest.json or the run directory above it), check every sha256.

    ``path`` may be a URI on object storage (``s3://bucket/run/artifact``, or the run directory above it).
    """
    from automl_tl.runs.locate import resolve_artifact
    from automl_tl.runs.storage import FileSystemStore, is_uri

    if store is None:
        path = resolve_artifact(path, reach_remote=True)
        store = FileSystemStore(path) if is_uri(path) else LocalStore(Path(path))
    root = Path(path)
    if not store.exists(MANIFEST_NAME):
        raise ArtifactError(f"{store.describe(MANIFEST_NAME)} is missing: {root} is not an automl_tl artifact")
    raw = store.read_bytes(MANIFEST_NAME)
    refuse_files_outside(raw, store, store.describe(MANIFEST_NAME))
    manifest = read_manifest(raw, store.describe(MANIFEST_NAME))
    weights = manifest.ensemble.weights
    artifact = Artifact(
        path=root,
        class_names=tuple(manifest.class_names),
        members=tuple(_record(m) for m in manifest.members),
        weights=tuple(x / sum(weights) for x in weights),
        temperature=manifest.ensemble.temperature,
        method=manifest.ensemble.method,
        metrics=manifest.metrics or {},
        versions=manifest.versions or {},
        store=store,
        decode_max_side=manifest.decode.max_side if manifest.decode else None,
        cascade=manifest.cascade.model_dump() if manifest.cascade else None,
    )
    for index in range(len(artifact.members)):  # fail now, not at the first prediction
        artifact.verified_bytes(index)
    return artifact
