"""GPU readiness: a small real sweep per backbone on every visible GPU, and the training images/s per GPU.

CI has no GPU, so this runs by hand on a CUDA machine (a cluster node, or the image from ``Dockerfile``)::

    .venv/bin/python benchmarks/gpu_check.py                                   # every registered backbone
    .venv/bin/python benchmarks/gpu_check.py --backbones mobilenetv2_100 --epochs 3 --data /data/flowers5
    .venv/bin/python benchmarks/gpu_check.py --dry-run                         # the plan and its weights only

Besides the registered backbones it checks one current hub backbone (``--current``, EVA-02 by default: a
ViT with rotary embeddings and SwiGLU blocks), its weights written from a random init into a temporary
``$AUTOML_TL_WEIGHTS_DIR`` as ``tests/test_backbone_families.py`` does: the loading path the hub's files
take, with no network, so a lent GPU also checks mixed precision and DDP on a current architecture.

Each backbone gets one trial of ``--epochs`` epochs through the real sweep (``run_search``): the Ray Train
engine, ``use_gpu=True``, one DDP worker per visible GPU, AMP (bf16 where the card has it, else fp16 with a
grad scaler) and channels-last, the backbone fully trainable so every image goes through the GPU (no feature
cache). images/s per GPU = training images per epoch / the fastest epoch's seconds / GPUs (the first epoch
pays for cuDNN autotuning and the data cache's first reads). Results go to
``benchmarks/results/gpu_check.json``; ``tests/test_gpu_check.py`` checks the plan and the GPU code path on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from automl_tl.config import ExperimentConfig, load_config  # noqa: E402
from automl_tl.errors import AutoMLError  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "flowers5"
# The family test's EVA-02: the smallest variant, built at any image size (a ViT timm sizes at build).
CURRENT_BACKBONE = "timm:eva02_tiny_patch14_224.mim_in22k"


@dataclasses.dataclass(frozen=True)
class CheckPlan:
    """What one backbone's check runs: the sweep config and the devices it expects."""

    backbone: str
    gpus: int
    config: ExperimentConfig
    weights_dir: str | None = None  # $AUTOML_TL_WEIGHTS_DIR for this check: where its local weights are


def plan_checks(backbones: list[str], gpus: int, data: str, cache_dir: str, epochs: int, batch_size: int,
                image_size: int | None, cpus: int) -> list[CheckPlan]:  # fmt: skip
    """One single-trial sweep per backbone: DDP over ``gpus`` workers, one GPU each, everything trainable."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    plans = []
    for backbone in backbones:
        config = load_config(
            {
                "data": {"source": data, "cache_dir": cache_dir},
                "space": {
                    "backbones": [backbone],
                    "freeze_depths": [0],  # the whole network trains: the GPU sees every image every epoch
                    "augmentations": ["light"],
                    "batch_sizes": [batch_size],
                    "image_sizes": [image_size] if image_size else [],
                    "max_epochs": epochs,
                    "heads": ["linear"],
                },
                "search": {"num_samples": 1, "scheduler": "none", "time_budget_s": 3600, "seed": 0},
                "resources": {
                    "trial_engine": "train",
                    "workers_per_trial": gpus,
                    "gpus_per_trial": float(gpus),
                    "cpus_per_worker": float(max(1, cpus // gpus - 1)),
                    "max_failures": 0,
                },
            }
        )
        plans.append(CheckPlan(backbone, gpus, config))
    return plans


def write_random_weights(backbone: str, folder: Path) -> Path:
    """Weights of ``timm:<architecture>[.<tag>]`` from a random init, in timm's key layout, at the file name a
    user puts downloaded weights under in ``$AUTOML_TL_WEIGHTS_DIR`` (``folder``); returns the file."""
    import timm
    import torch
    from safetensors.torch import save_file

    arch = backbone.removeprefix("timm:")
    if not backbone.startswith("timm:") or not timm.is_model(arch):
        raise ValueError(f"--current must name a timm model as timm:<architecture>[.<tag>], got {backbone!r}")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@contextlib.contextmanager
def weights_env(plan: CheckPlan) -> Iterator[None]:
    """The plan's weights folder as ``$AUTOML_TL_WEIGHTS_DIR`` for the block (the embedded Ray it starts and
    the trials inherit it); the environment as it was afterwards."""
    before = os.environ.get("AUTOML_TL_WEIGHTS_DIR")
    if plan.weights_dir is not None:
        os.environ["AUTOML_TL_WEIGHTS_DIR"] = plan.weights_dir
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("AUTOML_TL_WEIGHTS_DIR", None)
        else:
            os.environ["AUTOML_TL_WEIGHTS_DIR"] = before


def preflight(plan: CheckPlan) -> str:
    """What the sweep checks before Ray starts (backbone, weights, space), on CPU: the weight source it found."""
    from automl_tl.backbones import resolve_spec
    from automl_tl.sweep.driver import check_search

    with weights_env(plan):
        check_search(plan.config)
        return resolve_spec(plan.backbone).weights.describe()


def images_per_s_per_gpu(train_images: int, epoch_s: float, gpus: int) -> float:
    return train_images / epoch_s / gpus if epoch_s > 0 else 0.0


def _epoch_seconds(run_dir: Path) -> list[float]:
    seconds = []
    for path in (run_dir / "tune").glob("*/result.json"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                seconds.append(float(json.loads(line)["epoch_s"]))
    return seconds


def run_check(plan: CheckPlan, work: Path) -> dict[str, Any]:
    from automl_tl.sweep.driver import run_search

    run_dir = work / plan.backbone.replace(":", "_")
    started = time.time()
    with weights_env(plan):
        outcome = run_search(plan.config, run_dir, progress=False)
    data = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    epochs = _epoch_seconds(run_dir)
    best = min(epochs) if epochs else 0.0
    row = outcome.rows[0]
    return {
        "backbone": plan.backbone,
        "gpus": plan.gpus,
        "image_size": row.get("image_size"),
        "batch_size_per_gpu": row.get("batch_size"),
        "train_images": len(data["train"]),
        "epoch_s": [round(s, 2) for s in epochs],
        "images_per_s_per_gpu": round(images_per_s_per_gpu(len(data["train"]), best, plan.gpus), 1),
        "val_accuracy": row.get("best_val_accuracy"),
        "stop_reason": row.get("stop_reason"),
        "wall_s": round(time.time() - started, 1),
    }


def describe_devices() -> dict[str, Any]:
    """The GPUs, and the precision and memory layout the training loop picks for them."""
    import torch

    from automl_tl.train.loop import amp_dtype, memory_format_for

    if not torch.cuda.is_available():
        return {"cuda": False, "gpus": 0}
    device = torch.device("cuda", 0)
    return {
        "cuda": True,
        "gpus": torch.cuda.device_count(),
        "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "amp_dtype": str(amp_dtype(device)),
        "memory_format": str(memory_format_for(device)),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> int:
    from automl_tl.backbones import list_backbones

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", help="comma-separated (default: every registered backbone)")
    parser.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else "builtin:animal-shapes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per GPU")
    parser.add_argument("--image-size", type=int, help="default: each backbone's native size")
    parser.add_argument("--gpus", type=int, help="default: every visible GPU")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--current", default=CURRENT_BACKBONE,
                        help=f"a current timm backbone checked with local random-init weights (default "
                             f"{CURRENT_BACKBONE}; '' for none)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="the plan and its CPU-side checks; train nothing")
    args = parser.parse_args(argv)

    devices = describe_devices()
    gpus = args.gpus or devices["gpus"]
    if not gpus and not args.dry_run:
        print("gpu_check: no CUDA device is visible; run it on a GPU machine (or --dry-run for the plan)")
        return 2
    backbones = args.backbones.split(",") if args.backbones else list_backbones()
    cache = os.environ.get("AUTOML_TL_CACHE_DIR") or str(Path("~/.cache/automl_tl/datasets").expanduser())
    plan = functools.partial(plan_checks, gpus=max(gpus, 1), data=args.data, cache_dir=cache, epochs=args.epochs,
                             batch_size=args.batch_size, image_size=args.image_size, cpus=os.cpu_count() or 1)  # fmt: skip
    print(json.dumps({"devices": devices, "data": args.data}, indent=2))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        plans = plan(backbones)
        if args.current:
            weights = write_random_weights(args.current, Path(tmp) / "weights")
            plans += [dataclasses.replace(p, weights_dir=str(weights.parent)) for p in plan([args.current])]
        for each in plans:
            res = each.config.resources
            try:
                source = preflight(each)
            except AutoMLError as exc:
                print(f"gpu_check: {exc}")
                return 2
            print(f"{each.backbone}: {res.workers_per_trial} DDP worker(s), {res.gpus_per_trial:g} GPU(s), "
                  f"{res.cpus_per_worker:g} CPU(s) per worker, engine {res.engine()}, {args.epochs} epochs; "
                  f"weights: {source}")  # fmt: skip
        if args.dry_run:
            return 0
        for each in plans:
            row = run_check(each, Path(tmp))
            rows.append(row)
            print(f"{row['backbone']:<24} {row['images_per_s_per_gpu']:>8.1f} images/s per GPU "
                  f"({row['gpus']} GPU(s), {row['image_size']} px, epochs {row['epoch_s']} s)", flush=True)  # fmt: skip
    figures = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d"), "devices": devices, "data": args.data,
               "epochs": args.epochs, "results": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
