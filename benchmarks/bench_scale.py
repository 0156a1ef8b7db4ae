"""How the cost of the data grows with the set: the decoded cache against stream mode's encoded shards.

    .venv/bin/python benchmarks/bench_scale.py                          # 2 K, 20 K and 100 K generated images
    .venv/bin/python benchmarks/bench_scale.py --sizes 2000 20000 --side 96
    .venv/bin/python benchmarks/bench_scale.py --decode-only            # decode-and-augment at 224 px only

For each size it generates that many small JPEGs (two classes of gradients with noise, ``--side`` px) and, per
mode (``data.mode`` cache, then stream), runs in fresh processes:

* the ingest (``load_dataset``): images/s per core (the machine's cores; stream mode also counts Ray's
  workers), bytes per image stored (the cache file; the shards plus their index), the driver's peak RSS;
* one trial epoch over the train split as an inline trial reads it (cache: ``Dataset.image``; stream:
  ``stream_batches``), decoded and augmented (``light``) to 64 px, no model (the model's cost is the same in
  both modes): seconds per 1 K images and the trial process's peak RSS.

``--decode-only`` (also part of a full run) measures what a Ray Data CPU worker does per stream-mode image at
224 px: one process, one thread, decode of the shards of a photo set (hymenoptera) plus the ``light``
augmentation, in images/s per CPU. Results go to ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "scale.json"
PHOTOS = REPO.parent / "shared" / "datasets" / "hymenoptera" / "train"


def generate(folder: Path, count: int, side: int) -> None:
    """``count`` JPEGs of ``side`` x 3/4 ``side`` px in two class folders (skipped when already there)."""
    from PIL import Image

    marker = folder / f".done-{count}-{side}"
    if marker.is_file():
        return
    rng = np.random.default_rng(0)
    height = side * 3 // 4
    ramp = np.linspace(0, 255, side, dtype=np.float32)[None, :, None]
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = "ab"[i % 2]
        base = ramp if label == "a" else ramp[:, ::-1]
        pixels = np.clip(base + rng.normal(0, 24, (height, side, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=85)
        (folder / label / f"{i:06d}.jpg").write_bytes(out.getvalue())
    marker.touch()


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_ingest(data: str, cache: str, mode: str) -> dict[str, Any]:
    """In this process: load ``data`` in ``mode`` into ``cache`` and measure it."""
    from automl_tl.config import DataConfig
    from automl_tl.data import load_dataset

    config = DataConfig(source=data, cache_dir=cache, mode=mode, near_duplicates="keep")  # type: ignore[arg-type]
    if mode == "stream":  # Ray up before the clock: its start is not the ingest's cost
        from automl_tl._owned import start_embedded_ray

        start_embedded_ray(num_cpus=os.cpu_count() or 1, log_to_driver=False)
    started = time.perf_counter()
    ds = load_dataset(data, config, progress=False)
    elapsed = time.perf_counter() - started
    index = Path(ds.cache_path).stat().st_size
    stored = index + (_folder_bytes(Path(ds.shards)) if ds.shards else 0)
    cores = os.cpu_count() or 1
    return {
        "images": len(ds), "ingest_s": round(elapsed, 2),
        "ingest_images_per_s_per_core": round(len(ds) / elapsed / cores, 1),
        "bytes_per_image": round(stored / len(ds)), "index_bytes_per_image": round(index / len(ds)) if ds.shards else None,
        "driver_peak_rss_mib": _peak_rss_mib(), "cache_path": str(ds.cache_path),
    }  # fmt: skip


def run_epoch(cache_path: str) -> dict[str, Any]:
    """In this process: one epoch of the train split as an inline trial reads it, to 64 px, no model."""
    import torch

    from automl_tl.data import Dataset
    from automl_tl.inference.transforms import Preprocessing
    from automl_tl.backbones import resolve_spec
    from automl_tl.train.augment import array_to_tensor, train_transform
    from automl_tl.train.trial_data import stream_batches

    torch.set_num_threads(1)
    ds = Dataset.open(cache_path)
    rows = ds.indices("train")
    augment = train_transform("light", Preprocessing.from_spec(resolve_spec("mobilenetv2_100"), 64))
    started = time.perf_counter()
    seen = 0
    if ds.shards:
        for x, _ in stream_batches(ds.shards, ds.file_rows(rows), ds.labels[rows], 64, 0, augment):
            seen += len(x)
    else:
        order = np.random.default_rng(0).permutation(rows)
        for start in range(0, len(order), 64):
            x = torch.stack([augment(array_to_tensor(ds.image(int(i)))) for i in order[start : start + 64]])
            seen += len(x)
    elapsed = time.perf_counter() - started
    return {"epoch_images": seen, "epoch_s": round(elapsed, 2), "epoch_s_per_1k": round(1000 * elapsed / seen, 3),
            "trial_peak_rss_mib": _peak_rss_mib()}  # fmt: skip


def decode_rate(cache: str, seconds: float = 20.0) -> dict[str, Any]:
    """Decode + ``light`` augmentation at 224 px of a photo set's shards, one process and one thread."""
    import torch

    from automl_tl.backbones import resolve_spec
    from automl_tl.inference.transforms import Preprocessing
    from automl_tl.train.augment import train_transform
    from automl_tl.train.trial_data import stream_batches

    torch.set_num_threads(1)
    info = run_ingest(str(PHOTOS), cache, "stream")
    from automl_tl.data import Dataset

    ds = Dataset.open(info["cache_path"])
    rows = np.arange(len(ds))
    augment = train_transform("light", Preprocessing.from_spec(resolve_spec("tf_efficientnet_lite0"), 224))
    seen, started, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        for x, _ in stream_batches(ds.shards or "", ds.file_rows(rows), ds.labels[rows], 32, epoch, augment):
            seen += len(x)
        epoch += 1
    elapsed = time.perf_counter() - started
    return {"data": str(PHOTOS), "images": len(ds), "input_size": 224, "augmentation": "light",
            "stored_bytes_per_image": info["bytes_per_image"],
            "decode_augment_images_per_s_per_cpu": round(seen / elapsed, 1)}  # fmt: skip


def _child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--work", default=None, help="where the generated sets go (default: a temp folder)")
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--no-decode", action="store_true", help="keep decode_224 of an earlier --out file")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = {"ingest": lambda: run_ingest(*rest), "epoch": lambda: run_epoch(*rest),
                  "decode": lambda: decode_rate(*rest)}[kind]()  # fmt: skip
        print(json.dumps(result))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    figures: dict[str, Any] = {
        "benchmark": "bench_scale", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "side_px": args.side, "epoch": "train split, light augmentation to 64 px, no model, one thread",
    }  # fmt: skip
    out = Path(args.out)
    earlier = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    if args.no_decode:
        figures["decode_224"] = earlier.get("decode_224")
    else:
        figures["decode_224"] = _child("decode", str(work / "decode-cache"))
        print(json.dumps(figures["decode_224"]), flush=True)
    figures["sizes"] = dict(earlier.get("sizes") or {})  # sizes run earlier stay unless run again
    if not args.decode_only:
        for count in args.sizes:
            data = work / f"set-{count}"
            started = time.perf_counter()
            generate(data, count, args.side)
            row: dict[str, Any] = {"generate_s": round(time.perf_counter() - started, 1)}
            for mode in ("cache", "stream"):
                cache = work / f"cache-{count}-{mode}"
                ingest = _child("ingest", str(data), str(cache), mode)
                epoch = _child("epoch", ingest.pop("cache_path"))
                row[mode] = {**ingest, **epoch}
                print(count, mode, json.dumps(row[mode]), flush=True)
            figures["sizes"][str(count)] = row
            out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")  # each size as soon as it is done
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
