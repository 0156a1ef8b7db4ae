"""A trial's memory: what it will need (asked of Ray before it starts), what it used, and handing freed heap back.

Ray's memory monitor kills a worker when the node passes 95 % of its memory, and Tune 2.60 then stops the
whole sweep (two large fine-tuning trials scheduled side by side on a small machine do that). Each trial therefore asks Ray for its estimated peak as the ``memory`` resource, so Ray only
runs side by side the trials that fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["MALLOC_ENV", "malloc_env", "scoped_env", "tune_malloc", "trim_heap", "activation_share", "estimate_trial_bytes", "peak_rss_bytes", "reset_peak_rss"]

GIB = 2**30
# The process before training: torch, timm, the model and optimizer, Python, plus room
# for the memory-mapped image cache's resident pages.
BASE_BYTES = 1 * GIB
# Activation memory relative to fine-tuning everything, by the frozen fraction of the stages. Measured with
# torch 2.14 on CPU for the four registry backbones at depths 0, 2, 4, 6 and 7 of 8 (they agree within 0.05);
# a fully frozen extractor still holds the head's activations and the inference peak. Depth 1 (the stem and
# the first, shallow stage) saves almost nothing: 0.94 for tf_efficientnet_lite0 at 224 px and 0.97 for
# mobilenetv2_100 at 160 px, batch 32, where interpolating between depths 0 and 2 had said 0.79 (a lite2
# trial at depth 1 then peaked at 1.27x its request in a hymenoptera sweep).
_FROZEN_FRACTION = (0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0)
_ACTIVATION_SHARE = (1.0, 0.97, 0.57, 0.35, 0.21, 0.19, 0.12)
# The validation pass runs at the training batch size, and an inference batch holds about 0.3 of a
# training image's activations per image (more with MALLOC_ENV, whose heap keeps freed blocks): a nearly
# frozen network peaks there, not in its training step.
INFERENCE_SHARE = 0.3
# The measured step peak leaves out augmentation buffers and allocator slack (MALLOC_ENV's heap adds 4-8 % to a
# training step's peak).
MARGIN = 1.3
# A head on cached features may first have to compute them: one inference pass over the images in batches
# of 32, which peaks about as high above a cache hit as training on 14 images does.
EXTRACTION_IMAGES = 14
STEP_BYTES = GIB // 2  # requests are rounded up to this, so trials that ask alike share Tune's reused actors


def activation_share(freeze_depth: int, max_freeze_depth: int) -> float:
    """A training step's activation memory at this freeze depth, relative to fine-tuning everything."""
    return float(np.interp(freeze_depth / max(1, max_freeze_depth), _FROZEN_FRACTION, _ACTIVATION_SHARE))


def estimate_trial_bytes(
    train_kb_per_pixel: float,
    image_size: int,
    batch_size: int,
    freeze_depth: int,
    max_freeze_depth: int,
    val_images: int,
    frozen_features: bool,
    on_gpu: bool = False,
) -> int:
    """Host memory one trial (or one Ray Train worker) peaks at, rounded up to half a GiB.

    ``train_kb_per_pixel`` is the backbone's training activation memory per input pixel of one image when
    everything trains (:attr:`BackboneSpec.train_kb_per_pixel`). A head trained on cached features needs the
    process and the pass that may first compute the features. On a GPU a training step's activations live in
    device memory, so the host needs the process and the validation tensor.

    >>> estimate_trial_bytes(2.35, 260, 32, 0, 8, 36, False) / GIB  # lite2, everything trained
    7.5
    """
    pixels = image_size * image_size
    if frozen_features:
        need = BASE_BYTES + MARGIN * EXTRACTION_IMAGES * pixels * train_kb_per_pixel * 1024
    else:
        val_tensor = val_images * 3 * pixels * 4
        share = max(activation_share(freeze_depth, max_freeze_depth), INFERENCE_SHARE)
        activations = 0.0 if on_gpu else batch_size * pixels * train_kb_per_pixel * 1024 * share
        need = BASE_BYTES + MARGIN * (activations + val_tensor)
    return int(-(-need // STEP_BYTES) * STEP_BYTES)


def peak_rss_bytes() -> int | None:
    """This process's resident-set high-water mark (VmHWM) since it started or since :func:`reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss(pid: int | str = "self") -> None:
    """Restart a process's high-water mark from its current resident size (Linux ``clear_refs`` 5; a no-op
    elsewhere or for a process that ended), so that a reused trial actor reports each trial's own peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


# glibc malloc settings for processes that run torch on the CPU. By default every large allocation (an
# activation of a batch) is a fresh mmap, whose pages the kernel faults in and zeroes one by one, and
# free() unmaps it again: the next step pays the same again, so a CPU forward spends more time in the kernel
# than in torch (tests/test_sweep.py counts the page faults). Large blocks then come from
# the heap and stay there between steps; one arena keeps threads other than the main one (Tune runs a trial
# function in its own thread, Serve its replicas' code) off per-thread arenas, which mmap large blocks
# regardless. ``trim_heap`` still hands the free heap back between trials and batches.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(GIB),
    "MALLOC_TRIM_THRESHOLD_": str(GIB),
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


@contextlib.contextmanager
def scoped_env(settings: Mapping[str, str] | None = None) -> Iterator[None]:
    """``settings`` in this process's environment for the block (names already set keep their value); after
    it the environment is exactly as it was before, including what the libraries the block loads or starts set
    there (Ray and torch do): the library leaves its caller's process as it found it."""
    saved = dict(os.environ)
    for key, value in (settings or {}).items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def malloc_env() -> dict[str, str]:
    """:data:`MALLOC_ENV` for the processes we start (Ray's workers, Serve's replicas), less what the user
    exported: those are inherited and win. glibc reads them when a process starts."""
    return {key: value for key, value in MALLOC_ENV.items() if key not in os.environ}


def tune_malloc() -> None:
    """Apply :data:`MALLOC_ENV` to this process (``mallopt``), and export it to the processes it starts.

    Only for a process automl_tl owns (the CLI): the library never changes its caller's process, and hands
    :func:`malloc_env` to the processes it starts instead. glibc reads the variables only at start-up, so a
    running process sets the same values with ``mallopt``; threads that already own an arena keep it, so call
    this early. Settings the user exported win. A no-op where there is no glibc.
    """
    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)
    try:
        libc = ctypes.CDLL("libc.so.6")
        for option, key in ((_M_ARENA_MAX, "MALLOC_ARENA_MAX"), (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
                            (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_")):  # fmt: skip
            libc.mallopt(option, ctypes.c_int(int(os.environ[key])))
    except (OSError, AttributeError, ValueError):
        pass


def trim_heap(collect: bool = False) -> None:
    """``malloc_trim(0)``: return free heap pages to the system (glibc only; elsewhere a no-op).

    A trial actor that Tune reuses keeps the peak of the last trial's training step otherwise.
    ``collect`` runs the garbage collector first.
    """
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
