"""What an ARTIFACT argument points to: an artifact folder, its manifest, or the run directory above it.

Every command and call that takes an artifact (predict, evaluate, export, serve, ``Predictor.load``,
``load_artifact``) resolves it here, local paths and object storage (``s3://...``) alike::

    RUN_DIR/                    a run directory: its artifact is RUN_DIR/artifact
    RUN_DIR/artifact/           the artifact folder
    RUN_DIR/artifact/manifest.json
"""

from __future__ import annotations

import os
from pathlib import Path

from automl_tl.errors import ArtifactError
from automl_tl.runs.storage import FileSystemStore, is_uri, join

__all__ = ["ARTIFACT_DIR", "MANIFEST_NAME", "resolve_artifact", "run_dir_of"]

MANIFEST_NAME = "manifest.json"
ARTIFACT_DIR = "artifact"  # a run directory's artifact folder


def resolve_artifact(path: str | os.PathLike[str], *, reach_remote: bool = False) -> str:
    """The artifact folder ``path`` names: a local folder made absolute, or a URI without a trailing slash.

    ``path`` is an artifact folder, its ``manifest.json``, or a run directory (whose ``artifact/`` it means).
    A local path that is none of these raises :class:`ArtifactError`. A URI is taken as given unless
    ``reach_remote``: then the storage is asked whether it is a run directory (no manifest of its own, one in
    ``artifact/``); a missing manifest is left for the reader to report.
    """
    text = os.fspath(path)
    if is_uri(text):
        uri = text.rstrip("/")
        if uri.endswith("/" + MANIFEST_NAME):
            return uri[: -len(MANIFEST_NAME) - 1]
        if reach_remote and not FileSystemStore(uri).exists(MANIFEST_NAME):
            inner = join(uri, ARTIFACT_DIR)
            if FileSystemStore(inner).exists(MANIFEST_NAME):
                return inner
        return uri
    given = Path(text).expanduser()
    if given.name == MANIFEST_NAME and given.is_file():
        return str(given.parent.resolve())
    if (given / MANIFEST_NAME).is_file():
        return str(given.resolve())
    if (given / ARTIFACT_DIR / MANIFEST_NAME).is_file():
        return str((given / ARTIFACT_DIR).resolve())
    if not given.exists():
        raise ArtifactError(f"artifact {given} does not exist: expected a run directory or an artifact folder")
    raise ArtifactError(
        f"{given / MANIFEST_NAME} is missing, and so is {ARTIFACT_DIR}/{MANIFEST_NAME}: {given} is not a run "
        "directory or an automl_tl artifact"
    )


def run_dir_of(artifact: str | os.PathLike[str]) -> Path | None:
    """The local run directory an artifact was built in (``config.yaml`` and ``data.json`` beside or above the
    artifact folder), or None (a URI, or an artifact copied out of its run)."""
    if is_uri(artifact):
        return None
    folder = Path(resolve_artifact(artifact))
    for candidate in (folder, folder.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "data.json").is_file():
            return candidate
    return None
