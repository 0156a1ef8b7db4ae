"""Log records at the edge: the formats the command line writes the package's records in.

The package logs each stage's messages to ``logging.getLogger(__name__)`` loggers under ``automl_tl``, with
the stage (``search``, ``ensemble``, ``data`` ...) and the event's figures as the record's fields
(``extra=``), and installs no handler of its own. :func:`log_to` is what ``automl-tl`` (and a benchmark
script) wraps a command in: ``[stage] message`` lines, or one JSON object per record for ``--log-format json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "log_to"]


class TextFormatter(logging.Formatter):
    """A record as the commands print progress: ``[stage] message``."""

    def format(self, record: logging.LogRecord) -> str:
        stage = getattr(record, "stage", None)
        return f"[{stage}] {super().format(record)}" if stage else super().format(record)


# What every LogRecord has; the rest of a record's attributes are the fields its ``extra=`` gave it, bar private
# ones that a record factory adds (Ray's adds ``_ray_timestamp_ns``).
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "stage"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, stage and message, then the record's own fields (a
    trial event's trial_id, epoch, metric value, best so far, elapsed time)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "stage": getattr(record, "stage", None),
            "message": record.getMessage(),
        }  # fmt: skip
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_"))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(_json_safe(entry), default=str)


def _json_safe(value: Any) -> Any:
    """NaN and infinity as null: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class _BarSafeHandler(logging.StreamHandler[TextIO]):
    """Writes each record through tqdm, which clears a progress bar on the terminal and redraws it below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def log_to(stream: TextIO, log_format: str = "text", quiet: bool = False) -> Iterator[None]:
    """The package's records go to ``stream`` for the block, as text lines or JSON objects, only warnings and
    errors when ``quiet``. Only the ``automl_tl`` logger is touched, and it is as it was after the block."""
    handler = _BarSafeHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    package = logging.getLogger("automl_tl")
    level, propagate = package.level, package.propagate
    package.addHandler(handler)
    package.setLevel(logging.WARNING if quiet else logging.INFO)
    package.propagate = False  # one line per record, whatever handlers other libraries gave the root logger
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        package.propagate = propagate
