"""What a listed data source is: records of images to be, and a reader for each (no I/O here)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from automl_tl.data.report import SkippedFile

Payload = bytes | np.ndarray
Fetch = Callable[[], Payload]

class Record(NamedTuple):
    """One image to be: where it is shown as in reports, its class and the split the source gave ("" if none)."""

    path: str
    label: str
    split: str


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A listed source. ``fetchers()`` yields one zero-argument reader per record, in record order."""

    text: str
    kind: str
    records: tuple[Record, ...]
    classes: tuple[str, ...]  # sorted; includes class folders that hold no image (they fail the checks)
    skipped: tuple[SkippedFile, ...]
    ignored: int
    identity: str  # changes whenever any file, label or split changes (paths, sizes, modification times)
    fetchers: Callable[[], Iterator[Fetch]] = dataclasses.field(repr=False, compare=False)
    remote: bool = False  # on object storage: reading waits on the network more than on the CPU

    @property
    def given_splits(self) -> frozenset[str]:
        return frozenset(r.split for r in self.records if r.split)

    def as_split(self, split: str) -> DataSource:
        """The same source with every record in ``split`` (a separate test set)."""
        records = tuple(r._replace(split=split) for r in self.records)
        return dataclasses.replace(self, records=records, identity=digest([self.identity, f"as:{split}"]))


def digest(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()
