"""Where an artifact's files are read and written: one named file at a time, from a local folder or another
store (an S3 bucket through a pyarrow filesystem), never outside the artifact's folder."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from automl_tl.errors import ArtifactError

__all__ = ["ArtifactStore", "LocalStore", "refuse_files_outside"]


class ArtifactStore(Protocol):
    """Where an artifact's files live; names are plain file names inside one folder."""

    def read_bytes(self, name: str) -> bytes: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def exists(self, name: str) -> bool: ...

    def describe(self, name: str) -> str: ...


@dataclasses.dataclass(frozen=True)
class LocalStore:
    """An artifact folder on the local disk. Writes go to a temporary file, then are renamed into place."""

    root: Path

    def read_bytes(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{self.describe(name)} is missing") from None
        except OSError as exc:
            raise ArtifactError(f"cannot read {self.describe(name)}: {exc.strerror}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        from automl_tl.runs.storage import write_atomic

        write_atomic(self.root / name, data)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def describe(self, name: str) -> str:
        return str(self.root / name)


def refuse_files_outside(raw: bytes, store: ArtifactStore, where: str) -> None:
    """Refuse a manifest (its JSON bytes) that names a file outside its artifact folder (``../``, an absolute
    path, a symlink leading out), before any file it names is read. A manifest that does not parse is
    :func:`read_manifest`'s to report."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    members = manifest.get("members") if isinstance(manifest, Mapping) else None
    for i, member in enumerate(members if isinstance(members, list) else []):
        name = member.get("weight_file") if isinstance(member, Mapping) else None
        if not isinstance(name, str):
            continue  # a missing or mistyped field is the field check's to report
        if not name or name[0] == "." or "/" in name or "\\" in name or os.path.isabs(name):
            raise ArtifactError(
                f"{where}: members[{i}].weight_file {name!r:.80} is not a plain file name inside the artifact: "
                "a manifest names only files in its own folder"
            )
        if isinstance(store, LocalStore):
            target = (store.root / name).resolve()
            if not target.is_relative_to(store.root.resolve()):
                raise ArtifactError(
                    f"{where}: members[{i}].weight_file {name!r:.80} leads to {target}, outside the artifact "
                    "(a symlink): copy the file into the artifact folder instead"
                )
