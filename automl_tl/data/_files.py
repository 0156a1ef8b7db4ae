"""Where data lives: local paths and URIs (``s3://``, ``gs://``, ``file://``) behind one pyarrow filesystem.

Every source is read through :mod:`pyarrow.fs`, so local folders and object storage follow the same code
path (and the tests of one cover the other). A location given as a URI is treated as *remote*: a manifest
under it may not name files outside its folder (``../``), nor local paths, so a downloaded manifest cannot
make us read arbitrary files.
"""

from __future__ import annotations

import dataclasses
import posixpath
import unicodedata
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from automl_tl.errors import DatasetError

# Names the operating system or a file manager leaves behind; they are never data and are skipped silently.
_LITTER = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "__macosx", "icon\r", "$recycle.bin"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)


class FileEntry(NamedTuple):
    """One file found by a listing: its path in the filesystem, size and modification time."""

    path: str
    size: int
    mtime_ns: int


@dataclasses.dataclass(frozen=True)
class Location:
    """A resolved place: the filesystem, the path inside it and how the user wrote it."""

    fs: pafs.FileSystem
    path: str
    text: str
    scheme: str  # "" for a plain local path

    @property
    def is_uri(self) -> bool:
        return bool(self.scheme)

    @property
    def is_remote(self) -> bool:
        return self.is_uri and self.scheme != "file"

    def info(self, path: str | None = None) -> pafs.FileInfo:
        target = self.path if path is None else path
        try:
            info: pafs.FileInfo = self.fs.get_file_info(target)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"cannot reach {self.display(target)}: {exc}") from None
        return info

    def display(self, path: str) -> str:
        """How to show a path of this filesystem to the user (as a URI when the root was one)."""
        return f"{self.scheme}://{path}" if self.scheme else path

    def child(self, path: str) -> Location:
        return dataclasses.replace(self, path=path, text=self.display(path))


def locate(text: str) -> Location:
    """Resolve a path or URI to a filesystem location; a missing driver or bad URI is a DatasetError."""
    if "://" not in text:
        local = Path(text).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), local.as_posix(), text, "")
    scheme = urlsplit(text).scheme.lower()
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        fs, path = _from_fsspec(text, scheme, exc)
    return Location(fs, path.rstrip("/") or path, text, scheme)


def _from_fsspec(text: str, scheme: str, first_error: Exception) -> tuple[pafs.FileSystem, str]:
    """pyarrow lacks a driver for this scheme: fall back to fsspec when it is installed."""
    try:
        import fsspec
    except ImportError:
        raise DatasetError(
            f"cannot open {text!r}: {first_error}. For other object stores, pip install fsspec and its "
            f"driver (e.g. gcsfs, adlfs)"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:
        raise DatasetError(f"cannot open {text!r}: {exc}") from None
    handler: Any = pafs.FSSpecHandler(fs)
    return pafs.PyFileSystem(handler), str(path)


def is_litter(name: str) -> bool:
    """Hidden files, macOS resource forks and OS thumbnails: never data, skipped without a report."""
    return name.startswith(".") or name.lower() in _LITTER


def list_files(loc: Location, root: str) -> tuple[list[FileEntry], int]:
    """Every file under ``root`` (recursively), sorted by path, and how many litter files were ignored."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot list {loc.display(root)}: {exc}") from None
    files: list[FileEntry] = []
    ignored = 0
    skip = len(root.rstrip("/")) + 1
    litter_dirs: dict[str, bool] = {}  # one verdict per folder: this loop runs on every re-load
    for info in infos:
        if not info.is_file:
            continue
        path: str = info.path
        folder, _, name = path[skip:].rpartition("/")
        in_litter = litter_dirs.get(folder)
        if in_litter is None:
            in_litter = litter_dirs[folder] = any(is_litter(part) for part in folder.split("/") if part)
        if in_litter or is_litter(name):
            ignored += 1
            continue
        files.append(FileEntry(path, info.size or 0, info.mtime_ns or 0))
    files.sort()
    return files, ignored


def list_dirs(loc: Location, root: str) -> list[str]:
    """Names of the visible sub-folders directly under ``root``, sorted."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot list {loc.display(root)}: {exc}") from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not is_litter(i.base_name))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_file(path) as fh:
        data: bytes = fh.read()
    return data


def label_text(name: str) -> str:
    """A class name as stored: NFC-normalised so macOS (NFD) and Linux folder names agree."""
    return unicodedata.normalize("NFC", name.strip())


def resolve_member(loc: Location, base: str, text: str, where: str) -> str:
    """The filesystem path of a file a manifest names, relative to the manifest's folder ``base``.

    Local manifests may use absolute paths and ``..``. Under a URI root a path must stay inside ``base``,
    or be a full URI of the same scheme.
    """
    if not loc.is_uri:
        p = Path(text).expanduser()
        return (p if p.is_absolute() else Path(base) / p).resolve().as_posix()
    if "://" in text:
        scheme = urlsplit(text).scheme.lower()
        if scheme != loc.scheme:
            raise DatasetError(f"{where}: {text!r} is on another filesystem than the manifest ({loc.scheme}://)")
        return text.split("://", 1)[1]
    if text.startswith("/"):
        raise DatasetError(f"{where}: absolute path {text!r} is not allowed in a remote manifest; use a path "
                           "relative to the manifest or a full URI")
    joined = posixpath.normpath(posixpath.join(base, text))
    if not joined.startswith(base.rstrip("/") + "/"):
        raise DatasetError(
            f"{where}: path {text!r} escapes the manifest's folder {loc.display(base)}; remote manifests may "
            "only name files under their own folder"
        )
    return joined
