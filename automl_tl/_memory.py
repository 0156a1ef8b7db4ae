"""Giving freed heap memory back to the system, for long-lived processes that run many jobs in turn."""

from __future__ import annotations

import ctypes
import gc

__all__ = ["trim_heap"]


def trim_heap(collect: bool = False) -> None:
    """``malloc_trim(0)``: return free heap pages to the system (glibc only; elsewhere a no-op).

    A trial actor that Tune reuses keeps the peak of the last trial's training step otherwise: after a
    tf_efficientnet_lite2 fine-tuning step at 260 px (5.5 GB peak) the process held 1.9 GB, and 0.7 GB
    after trimming. ``collect`` runs the garbage collector first.
    """
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
