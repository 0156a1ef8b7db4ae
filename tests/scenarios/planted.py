"""Planted faults for the data diagnostics: a copy of a class-folder data set with altered copies of some
images (some filed under another class, some forced into another split), flipped labels and outliers.
Used by tests/test_diagnostics.py and benchmarks/bench_diagnostics.py, with a seed.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Planted:
    """Paths (relative to ``root``, as the data set names them) of what was planted."""

    root: Path
    copies: tuple[tuple[str, str], ...]  # (original, altered copy)
    flipped: tuple[str, ...]  # images filed under a wrong class
    outliers: tuple[str, ...]


def altered(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A recognisable copy: cropped to 80-95 %, resized to 50-90 %, maybe mirrored, JPEG quality 30-70."""
    image = image.convert("RGB")
    w, h = image.size
    keep = rng.uniform(0.80, 0.95)
    cw, ch = int(w * keep), int(h * keep)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    scale = rng.uniform(0.5, 0.9)
    image = image.resize((max(16, int(cw * scale)), max(16, int(ch * scale))))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(30, 71)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def plant(
    source: Path,
    dest: Path,
    *,
    seed: int,
    per_class: int | None = None,
    copies: int = 0,
    cross_class: int = 0,
    flip_fraction: float = 0.0,
    outliers: int = 0,
) -> Planted:
    """Copy ``source`` (DIR/<class>/<images>) to ``dest`` with faults planted: ``copies`` altered copies of
    random images, ``cross_class`` of them filed under another class; a ``flip_fraction`` of the originals
    moved to a random other class; ``outliers`` noise images spread over the classes."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    files = {c: sorted(p for p in (source / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    if per_class is not None:
        files = {c: [fs[int(i)] for i in sorted(rng.choice(len(fs), min(per_class, len(fs)), replace=False))]
                 for c, fs in files.items()}  # fmt: skip
    originals = [(c, f) for c in classes for f in files[c]]
    for c in classes:
        (dest / c).mkdir(parents=True, exist_ok=True)
    n_flip = int(round(flip_fraction * len(originals)))
    flip = set(rng.choice(len(originals), n_flip, replace=False).tolist()) if n_flip else set()
    written: dict[int, str] = {}
    flipped = []
    for k, (c, f) in enumerate(originals):
        label = c
        if k in flip:
            label = str(rng.choice([o for o in classes if o != c]))
        target = dest / label / f"{c}-{f.name}"
        shutil.copyfile(f, target)
        written[k] = f"{label}/{target.name}"
        if k in flip:
            flipped.append(written[k])
    pairs = []
    chosen = rng.choice([k for k in range(len(originals)) if k not in flip], copies, replace=False)
    for n, k in enumerate(chosen.tolist()):
        c, f = originals[k]
        label = str(rng.choice([o for o in classes if o != c])) if n < cross_class else c
        target = dest / label / f"copy{n}-{f.stem}.jpg"
        with Image.open(f) as img:
            altered(img, rng).save(target, quality=95)
        pairs.append((written[k], f"{label}/{target.name}"))
    odd = []
    for n in range(outliers):
        noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        target = dest / classes[n % len(classes)] / f"outlier{n}.png"
        Image.fromarray(noise).save(target)
        odd.append(f"{classes[n % len(classes)]}/{target.name}")
    return Planted(dest, tuple(pairs), tuple(flipped), tuple(odd))
