"""What validation found: counts per class and split, image sizes, every skipped file with its reason,
exact duplicates and label conflicts. ``automl-tl inspect DATA [--json FILE]`` prints it.

Reason codes for skipped files (stable names, used in the JSON report and by tests):

    empty-file            the file has 0 bytes
    not-an-image          no image format recognises the bytes (a text file named .jpg, random bytes)
    truncated             the image ends early
    corrupt               the header is an image's but the data cannot be decoded
    oversized             more pixels than ``data.max_image_pixels`` (guards against decompression bombs)
    unsupported-mode      decodable, but in a pixel format with no RGB conversion
    unreadable            storage refused to return the bytes (permissions, network)
    outside-class-folder  an image with no class: directly in the data folder or in a split folder
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["DataReport", "SkippedFile", "DuplicateGroup", "SizeStats", "format_report", "REASONS"]

STATUS_OK = "ok"
REASON_EMPTY = "empty-file"
REASON_NOT_IMAGE = "not-an-image"
REASON_TRUNCATED = "truncated"
REASON_CORRUPT = "corrupt"
REASON_OVERSIZED = "oversized"
REASON_UNSUPPORTED = "unsupported-mode"
REASON_UNREADABLE = "unreadable"
REASON_OUTSIDE = "outside-class-folder"
REASONS: tuple[str, ...] = (
    REASON_EMPTY,
    REASON_NOT_IMAGE,
    REASON_TRUNCATED,
    REASON_CORRUPT,
    REASON_OVERSIZED,
    REASON_UNSUPPORTED,
    REASON_UNREADABLE,
    REASON_OUTSIDE,
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
_MAX_LISTED = 100  # terminal listing; the JSON report always holds everything


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A file left out of the data set, with a reason code from :data:`REASONS` and a human detail."""

    path: str
    reason: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class DuplicateGroup:
    """Files with identical bytes. ``kept`` are the copies the data set uses (none for a label conflict)."""

    id: str
    paths: tuple[str, ...]
    labels: tuple[str, ...]
    kept: tuple[str, ...]

    @property
    def conflict(self) -> bool:
        """The same image is filed under two or more classes."""
        return len(set(self.labels)) > 1


@dataclasses.dataclass(frozen=True)
class SizeStats:
    """Original image sizes (before the cache's resize) of the images in the data set."""

    min_width: int = 0
    median_width: float = 0.0
    max_width: int = 0
    min_height: int = 0
    median_height: float = 0.0
    max_height: int = 0
    max_cached_side: int = 0


@dataclasses.dataclass(frozen=True)
class DataReport:
    """The outcome of validating one data set (and its separate test set, if any)."""

    source: str
    kind: str
    test_source: str | None
    class_names: tuple[str, ...]
    files_seen: int  # candidate image files: every record plus every file skipped while listing
    images: int  # images in the data set, after duplicates were resolved
    counts: Mapping[str, Mapping[str, int]]  # split -> class -> images
    given_splits: tuple[str, ...]  # splits the source (or a separate test set) named
    drawn_splits: tuple[str, ...]  # splits drawn per class with the seed; a split in neither stays empty
    seed: int
    val_fraction: float
    test_fraction: float
    sizes: SizeStats
    modes: Mapping[str, int]  # original pixel modes (RGB, L, P, ...) of the images in the data set
    skipped: tuple[SkippedFile, ...]
    duplicates: tuple[DuplicateGroup, ...]
    duplicates_dropped: int
    ignored_files: int  # hidden files, OS litter and non-image notes: never data, never listed
    cache_path: str
    cache_hit: bool
    # Why a sweep cannot run on this data (an empty class, a single class, a class too small for the splits).
    problems: tuple[str, ...] = ()
    # How trials read the images: "cache" (the decoded file above) or "stream" (the Parquet shards named here),
    # and the data.mode setting that chose it with its threshold (data.stream_above_gb).
    data_mode: str = "cache"
    shards: str | None = None
    mode_setting: str = "auto, streams above 50 GB decoded"

    @property
    def label_conflicts(self) -> tuple[DuplicateGroup, ...]:
        return tuple(g for g in self.duplicates if g.conflict)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.skipped:
            out[s.reason] = out.get(s.reason, 0) + 1
        return out

    def skip_reason(self, path: str) -> str | None:
        """The reason code ``path`` was skipped for, or None when it was not."""
        return next((s.reason for s in self.skipped if s.path == path), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "duplicates":
                value = [dict(dataclasses.asdict(g), conflict=g.conflict) for g in value]
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)  # type: ignore[arg-type]
            elif f.name == "skipped":
                value = [dataclasses.asdict(s) for s in value]
            elif isinstance(value, Mapping):
                value = {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["label_conflicts"] = len(self.label_conflicts)
        out["skipped_by_reason"] = self.skipped_by_reason
        return out


def format_report(report: DataReport) -> str:
    """The report as a terminal table followed by every skipped file, duplicate and conflict."""
    lines = [f"data: {report.source} ({report.kind})"]
    if report.test_source:
        lines.append(f"test data: {report.test_source}")
    lines.append(f"cache: {report.cache_path} ({'reused' if report.cache_hit else 'written'})")
    where = f", shards in {report.shards}" if report.shards else ""
    lines.append(f"data mode: {report.data_mode}{where} (data.mode: {report.mode_setting})")
    lines.append(
        f"images: {report.images} in the data set, from {report.files_seen} files; {len(report.skipped)} skipped, "
        f"{report.duplicates_dropped} duplicate copies dropped, {report.ignored_files} hidden/other files ignored"
    )
    how = f"given: {', '.join(report.given_splits)}" if report.given_splits else "none given"
    if report.drawn_splits:
        fractions = ", ".join(f"{s}_fraction {getattr(report, s + '_fraction')}" for s in report.drawn_splits)
        how += f"; drawn per class with seed {report.seed}: {fractions}"
    lines.append(f"splits: {how}")
    width = max([len("class"), len("total")] + [len(c) for c in report.class_names])
    lines.append(f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'total':>8}")
    for name in report.class_names:
        row = [report.counts.get(s, {}).get(name, 0) for s in SPLITS]
        lines.append(f"  {name:<{width}}" + "".join(f"{n:>8}" for n in row) + f"{sum(row):>8}")
    totals = [sum(report.counts.get(s, {}).values()) for s in SPLITS]
    lines.append(f"  {'total':<{width}}" + "".join(f"{n:>8}" for n in totals) + f"{sum(totals):>8}")
    z = report.sizes
    lines.append(
        f"image size: width {z.min_width}..{z.max_width} (median {z.median_width:g}), height "
        f"{z.min_height}..{z.max_height} (median {z.median_height:g}); cached at most {z.max_cached_side} px"
    )
    lines.append("modes: " + (", ".join(f"{m} {n}" for m, n in sorted(report.modes.items())) or "-"))
    if report.skipped:
        by_reason = ", ".join(f"{r} {n}" for r, n in sorted(report.skipped_by_reason.items()))
        lines.append(f"skipped files ({len(report.skipped)}: {by_reason}):")
        lines += [
            f"  {s.path}: {s.reason}" + (f" ({s.detail})" if s.detail else "") for s in report.skipped[:_MAX_LISTED]
        ]
        lines += _more(len(report.skipped))
    plain = [g for g in report.duplicates if not g.conflict]
    if plain:
        lines.append(f"duplicates ({len(plain)} groups of identical files; one copy kept):")
        lines += [f"  {g.labels[0]}: {', '.join(g.paths)}" for g in plain[:_MAX_LISTED]]
        lines += _more(len(plain))
    if report.problems:
        lines.append(f"problems ({len(report.problems)}; `automl-tl search` refuses this data until they are fixed):")
        lines += [f"  {p}" for p in report.problems]
    conflicts = report.label_conflicts
    if conflicts:
        lines.append(f"label conflicts ({len(conflicts)}: identical files under different classes):")
        lines += [
            f"  {' / '.join(f'{p} [{lab}]' for p, lab in zip(g.paths, g.labels))}"
            + (" -> kept: " + ", ".join(g.kept) if g.kept else " -> all copies left out")
            for g in conflicts[:_MAX_LISTED]
        ]
        lines += _more(len(conflicts))
    return "\n".join(lines)


def _more(count: int) -> list[str]:
    return [f"  ... and {count - _MAX_LISTED} more (see --json)"] if count > _MAX_LISTED else []
