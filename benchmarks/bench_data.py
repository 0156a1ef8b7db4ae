"""Data layer throughput: first validation+caching pass vs cached re-load vs a plain PIL decode loop.

    .venv/bin/python benchmarks/bench_data.py                 # flowers5 from ../shared/datasets
    .venv/bin/python benchmarks/bench_data.py --data DIR --repeats 5

Writes benchmarks/results/data.json. Targets (issue 3): the cached re-load is at least 20x faster than the
first pass, and the first pass is within 2x of the plain PIL loop over the same files. Each figure is the
median of ``--repeats`` runs, interleaved so that load from other processes hits all three alike; files are
read once beforehand so the page cache, not the disk, serves every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from automl_tl.config import DataConfig  # noqa: E402
from automl_tl.data import load_dataset, resolve_source  # noqa: E402
from automl_tl.data._ingest import decode_workers  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "flowers5"
RESULTS = REPO / "benchmarks" / "results" / "data.json"


def plain_pil_loop(paths: list[str]) -> float:
    """What a naive loader does: open, convert to RGB, make an array; one thread."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            np.asarray(im.convert("RGB"))
    return time.perf_counter() - start


def first_pass(data: str, workers: int | None) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bench_data_") as cache:
        config = DataConfig(cache_dir=cache, decode_workers=workers)
        start = time.perf_counter()
        ds = load_dataset(data, config, progress=False)
        elapsed = time.perf_counter() - start
        assert not ds.report.cache_hit
        return elapsed, ds.report.files_seen


def reload(data: str, config: DataConfig) -> float:
    start = time.perf_counter()
    ds = load_dataset(data, config, progress=False)
    elapsed = time.perf_counter() - start
    assert ds.report.cache_hit
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a folder per class (default: flowers5)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        print(f"bench_data: {args.data} not found (the shared datasets ship beside the checkout)", file=sys.stderr)
        return 2
    source = resolve_source(args.data)
    root = Path(args.data).resolve()
    paths = [str(root / r.path) for r in source.records]
    for p in paths:  # warm the page cache: we measure decoding, not the disk
        Path(p).read_bytes()
    workers = decode_workers(DataConfig())

    baseline, first, first_1thread, reloads = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_data_reload_") as cache:
        config = DataConfig(cache_dir=cache)
        load_dataset(args.data, config, progress=False)
        for _ in range(args.repeats):
            baseline.append(plain_pil_loop(paths))
            elapsed, files = first_pass(args.data, None)
            first.append(elapsed)
            first_1thread.append(first_pass(args.data, 1)[0])
            reloads += [reload(args.data, config) for _ in range(5)]

    n = len(paths)
    t_base, t_first, t_first1, t_reload = (statistics.median(x) for x in (baseline, first, first_1thread, reloads))
    result = {
        "data": args.data,
        "images": n,
        "machine": {
            "cpus": os.cpu_count(),
            "decode_threads": workers,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "pyarrow": pa.__version__,
        },
        "repeats": args.repeats,
        "plain_pil_loop": {"seconds": round(t_base, 4), "images_per_s": round(n / t_base, 1)},
        "first_pass": {"seconds": round(t_first, 4), "images_per_s": round(n / t_first, 1)},
        "first_pass_1_thread": {"seconds": round(t_first1, 4), "images_per_s": round(n / t_first1, 1)},
        "cached_reload": {"seconds": round(t_reload, 4), "images_per_s": round(n / t_reload, 1)},
        "reload_speedup_vs_first_pass": round(t_first / t_reload, 1),
        "first_pass_vs_plain_pil": round(t_first / t_base, 2),
        "targets": {
            "reload_speedup_at_least": 20,
            "first_pass_vs_plain_pil_at_most": 2.0,
            "met": bool(t_first / t_reload >= 20 and t_first / t_base <= 2.0),
        },
        "all_runs_s": {
            "plain_pil_loop": [round(x, 4) for x in baseline],
            "first_pass": [round(x, 4) for x in first],
            "first_pass_1_thread": [round(x, 4) for x in first_1thread],
            "cached_reload": [round(x, 4) for x in reloads],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("images", "plain_pil_loop", "first_pass", "first_pass_1_thread",
                                             "cached_reload", "reload_speedup_vs_first_pass",
                                             "first_pass_vs_plain_pil", "targets")}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
