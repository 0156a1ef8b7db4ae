"""Run directories on shared storage: what a sweep over several nodes needs every node to reach.

A run directory is a local path or a URI (``s3://bucket/prefix``, or any scheme pyarrow or fsspec opens).
On a multi-node cluster it must be a URI, or a local path on a filesystem every node mounts (``--shared-fs``):

* the driver keeps a local *mirror* of a remote run directory (``$AUTOML_TL_RUNS_DIR/<hash>``, default
  ``~/.cache/automl_tl/runs/<hash>``), writes the small files there and pushes them;
* Ray Tune keeps the experiment state and every checkpoint under ``<uri>/tune`` itself;
* the data cache (one Arrow file named by its content key) is uploaded once to ``<uri>/data/<key>.arrow``;
  each node downloads it once into its own cache folder (``$AUTOML_TL_CACHE_DIR``), where the same name
  means the same content, so a second sweep on the same data downloads nothing;
* a trial writes its best epoch into a node-local staging folder and uploads it to ``<uri>/trials/<id>/``.

Credentials and endpoints come from where each filesystem looks for them (for S3: the ``AWS_*`` variables,
``AWS_ENDPOINT_URL`` for an S3-compatible server, or the instance's role).

    .venv/bin/python -m pytest -q tests/test_storage.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from automl_tl.errors import ArtifactError, AutoMLError, SearchError

if TYPE_CHECKING:
    from automl_tl.train.trial_data import TrialData

__all__ = [
    "FileSystemStore",
    "atomic_path",
    "RUNS_ENV",
    "discard_staging",
    "download",
    "exists",
    "fetch_once",
    "filesystem",
    "is_uri",
    "join",
    "local_data_cache",
    "local_mirror",
    "localize_data",
    "share_file",
    "trial_output",
    "upload",
    "write_atomic",
    "write_atomic_fs",
]

RUNS_ENV = "AUTOML_TL_RUNS_DIR"


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A fresh path beside ``target`` to write, moved over ``target`` when the block ends without an error and
    removed when it raises: a reader, or a writer killed midway, never sees a half-written ``target``.

    The path ends in ``target``'s suffix, for writers that add their own (``np.savez``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial{target.suffix}")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # gone already after the move


def write_atomic(location: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) whole to a local path or a URI: readers see the old file or the new one."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_uri(location):
        fs, path = filesystem(os.fspath(location))
        write_atomic_fs(fs, path, payload)
        return
    with atomic_path(Path(location)) as partial:
        partial.write_bytes(payload)


def write_atomic_fs(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """:func:`write_atomic` through a pyarrow filesystem (errors are pyarrow's and the OS's, for the caller).

    An object store publishes an object whole when its stream closes; any other filesystem gets a partial
    file moved over the target.
    """
    if fs.type_name in _OBJECT_STORES:
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    partial = f"{path}.{uuid.uuid4().hex[:12]}.partial"
    with fs.open_output_stream(partial) as out:
        out.write(data)
    fs.move(partial, path)


_OBJECT_STORES = frozenset({"s3", "gcs"})


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names object storage (``s3://...``) rather than a local path."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def filesystem(uri: str, error: type[AutoMLError] = SearchError) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path behind a local path or URI; a bad one raises ``error``."""
    from automl_tl.data._files import locate
    from automl_tl.errors import DatasetError

    try:
        loc = locate(uri)
    except DatasetError as exc:
        raise error(str(exc)) from None
    return loc.fs, loc.path


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    try:
        info: pafs.FileInfo = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise SearchError(f"cannot reach {uri}: {exc}") from None
    return info


def exists(uri: str) -> bool:
    return bool(_info(uri).type != pafs.FileType.NotFound)


def upload(local: Path, uri: str) -> None:
    """Copy a local file or folder (recursively) to ``uri``."""
    fs, path = filesystem(uri)
    try:
        if local.is_dir():
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with fs.open_output_stream(path) as out, open(local, "rb") as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
    except (OSError, pa.ArrowException) as exc:
        raise SearchError(f"cannot upload {local} to {uri}: {exc}") from None


def download(uri: str, local: Path) -> bool:
    """Copy ``uri`` (a file or a folder) to ``local``; False when there is nothing at ``uri``.

    A folder is synced: a file already in ``local`` with the remote size and a modification time no older
    than the remote one (rsync's quick check) is not fetched again. A sweep into object storage pulls its
    trials at the end and the results step pulls them again, each trial's checkpoint included.
    """
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
            root = path.rstrip("/") + "/"
            for item in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
                target = local / item.path[len(root) :]
                if item.type == pafs.FileType.File and not _up_to_date(target, item):
                    _fetch_file(fs, item.path, target)
            return True
        _fetch_file(fs, path, local)
        return True
    except (OSError, pa.ArrowException) as exc:
        raise SearchError(f"cannot download {uri} to {local}: {exc}") from None


def _up_to_date(local: Path, remote: pafs.FileInfo) -> bool:
    try:
        stat = local.stat()
    except OSError:
        return False
    mtime_ns = remote.mtime_ns
    return stat.st_size == remote.size and mtime_ns is not None and stat.st_mtime_ns >= mtime_ns


def _fetch_file(fs: pafs.FileSystem, path: str, local: Path) -> None:
    with atomic_path(local) as partial, fs.open_input_stream(path) as src, open(partial, "wb") as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)


def share_file(local: Path, uri: str) -> None:
    """Upload ``local`` to ``uri`` unless a file of the same size is already there (content-named files)."""
    info = _info(uri)
    if info.type == pafs.FileType.File and info.size == local.stat().st_size:
        return
    upload(local, uri)


def fetch_once(uri: str, local: Path) -> Path:
    """``local``, downloaded from ``uri`` unless already there; one process per node downloads, others wait."""
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.with_name(f".{local.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if local.is_file():
            return local
        if not download(uri, local):
            raise SearchError(f"{uri} is missing: the sweep's data cache was not uploaded to the run directory")
    return local


def local_mirror(uri: str) -> Path:
    """The driver's local working copy of the remote run directory ``uri``."""
    root = Path(os.environ.get(RUNS_ENV) or "~/.cache/automl_tl/runs").expanduser()
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "run"
    return root / f"{name}-{_run_key(uri)}"


def _run_key(uri: str) -> str:
    """A short, stable name for the run directory ``uri`` in local folders (mirror, trial staging)."""
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]


def _node_copy(shared: str, data_id: str) -> Path:
    """This node's copy of a run's shared data cache, fetched once."""
    return fetch_once(shared, node_cache_dir() / f"{data_id}.arrow")


def node_cache_dir() -> Path:
    """This node's data cache folder: ``$AUTOML_TL_CACHE_DIR``, else ``~/.cache/automl_tl/datasets``."""
    from automl_tl.config import DataConfig
    from automl_tl.data._cache import cache_dir

    return cache_dir(DataConfig())


def localize_data(data: TrialData) -> TrialData:
    """The trial's data with ``cache_path`` on this node: fetched once from shared storage when it is there."""
    if data.shared_cache is None:
        return data
    path = _node_copy(data.shared_cache, data.data_id)
    return dataclasses.replace(data, cache_path=str(path), feature_cache_dir=str(path.parent / "features"))


def local_data_cache(data_info: dict[str, Any]) -> str:
    """The data cache file of a run's ``data.json`` on this machine (downloaded when only shared storage has it)."""
    path = str(data_info["cache_path"])
    shared = data_info.get("shared_cache")
    if Path(path).is_file() or not shared:
        return path
    return str(_node_copy(str(shared), str(data_info["data_id"])))


def trial_output(run_location: str, trial_id: str) -> tuple[Path, Callable[[], None]]:
    """Where a trial writes its best epoch, and how to publish it to the run directory.

    A local run directory is written in place (publishing does nothing); for a remote one the trial writes
    into a node-local staging folder that ``publish`` uploads to ``<run>/trials/<trial_id>/``.
    """
    if not is_uri(run_location):
        return Path(run_location) / "trials" / trial_id, lambda: None
    staging = Path(tempfile.gettempdir()) / "automl_tl_trials" / _run_key(run_location) / trial_id
    staging.mkdir(parents=True, exist_ok=True)
    target = join(run_location, "trials", trial_id)

    def publish() -> None:
        upload(staging, target)

    return staging, publish


def discard_staging(run_location: str, out_dir: Path) -> None:
    """Remove a finished trial's node-local staging folder (its files are on the shared storage by now)."""
    if is_uri(run_location):
        shutil.rmtree(out_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the run's folder, once its last trial on this node is done
            out_dir.parent.rmdir()


@dataclasses.dataclass(frozen=True)
class FileSystemStore:
    """An artifact folder on object storage (an :class:`~automl_tl.inference.artifact.ArtifactStore`)."""

    uri: str

    def _path(self, name: str) -> tuple[pafs.FileSystem, str]:
        fs, root = filesystem(self.uri, ArtifactError)
        return fs, f"{root.rstrip('/')}/{name}"

    def read_bytes(self, name: str) -> bytes:
        fs, path = self._path(name)
        try:
            with fs.open_input_stream(path) as fh:
                data: bytes = fh.read()
        except FileNotFoundError:
            raise ArtifactError(f"{self.describe(name)} is missing") from None
        except (OSError, pa.ArrowException) as exc:
            raise ArtifactError(f"cannot read {self.describe(name)}: {exc}") from None
        return data

    def write_bytes(self, name: str, data: bytes) -> None:
        fs, path = self._path(name)
        try:
            write_atomic_fs(fs, path, data)
        except (OSError, pa.ArrowException) as exc:
            raise ArtifactError(f"cannot write {self.describe(name)}: {exc}") from None

    def exists(self, name: str) -> bool:
        fs, path = self._path(name)
        try:
            return bool(fs.get_file_info(path).type == pafs.FileType.File)
        except (OSError, pa.ArrowException) as exc:
            raise ArtifactError(f"cannot reach {self.describe(name)}: {exc}") from None

    def describe(self, name: str) -> str:
        return join(self.uri, name)


def main(argv: list[str] | None = None) -> int:
    """``python -m automl_tl.runs.storage fetch URI DIR``: copy a run's artifact (or any folder) to a local path.

    What a Kubernetes init container runs to put an artifact from object storage where serving reads it.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m automl_tl.runs.storage")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download URI (a file or a folder) to DIR")
    fetch.add_argument("uri")
    fetch.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        if not download(args.uri, Path(args.dest)):
            raise SearchError(f"{args.uri} does not exist")
    except AutoMLError as exc:
        print(f"automl_tl.runs.storage: error: {exc}", file=sys.stderr)
        return 2
    print(f"fetched {args.uri} to {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
