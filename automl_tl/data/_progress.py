"""Progress of a long step on stderr: one line rewritten in place on a terminal, a line every few seconds
in a log file, nothing at all when disabled."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_TTY_INTERVAL_S = 0.1
_LOG_INTERVAL_S = 5.0


class Progress:
    """Counts finished items of ``total`` and shows the rate and the time left."""

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self._label = label
        self._total = total
        self._enabled = enabled and total > 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._start = time.monotonic()
        self._last = self._start
        self._done = 0
        if self._enabled and not self._tty:
            self._emit(f"{label}: {total} files")

    def advance(self, count: int = 1) -> None:
        self._done += count
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last >= (_TTY_INTERVAL_S if self._tty else _LOG_INTERVAL_S):
            self._last = now
            self._emit(self._status(now))

    def close(self) -> None:
        if not self._enabled:
            return
        elapsed = time.monotonic() - self._start
        rate = self._done / elapsed if elapsed > 0 else 0.0
        self._emit(f"{self._label}: {self._done}/{self._total} done in {elapsed:.1f}s ({rate:.0f}/s)")
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def _status(self, now: float) -> str:
        elapsed = now - self._start
        rate = self._done / elapsed if elapsed > 0 else 0.0
        eta = (self._total - self._done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self._done / self._total
        return f"{self._label}: {self._done}/{self._total} ({pct:.0f}%), {rate:.0f}/s, ETA {_clock(eta)}"

    def _emit(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r\033[K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
