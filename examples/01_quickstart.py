"""Quickstart: search a labelled folder, print the test metrics, classify one image.

    .venv/bin/python examples/01_quickstart.py path/to/images --out runs/quickstart --time-budget-s 600
    .venv/bin/python examples/01_quickstart.py --smoke-test      # a one-minute run on ../shared/datasets

The folder holds one sub-folder per class (or train/ val/ test/ folders of class folders).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import automl_tl

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"

# The smoke test keeps the sweep tiny: one backbone, small images, frozen features, two short trials.
SMOKE_CONFIG = {
    "space": {"backbones": ["mobilenetv2_100"], "image_sizes": [64], "max_epochs": 2, "batch_sizes": [32],
              "freeze_depths": [8], "augmentations": ["none"]},
    "search": {"num_samples": 2},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="labelled image folder")
    parser.add_argument("--test", help="a separate labelled folder for the final evaluation")
    parser.add_argument("--out", default="runs/quickstart", help="run directory")
    parser.add_argument("--time-budget-s", type=float, default=600.0)
    parser.add_argument("--smoke-test", action="store_true", help="tiny run on ../shared/datasets/hymenoptera")
    args = parser.parse_args()

    config = None
    data, test = args.data, args.test
    if args.smoke_test:
        data, test = str(SHARED / "hymenoptera" / "train"), str(SHARED / "hymenoptera" / "val")
        config, args.time_budget_s = SMOKE_CONFIG, 120.0
    if not data:
        parser.error("give a labelled image folder (or --smoke-test)")

    logging.basicConfig(format="%(message)s")  # the search's progress, on stderr
    logging.getLogger("automl_tl").setLevel(logging.INFO)
    result = automl_tl.search(data, args.out, test=test, config=config, time_budget_s=args.time_budget_s)
    best = result.best
    print(f"best trial {best.trial_id}: {best.params['backbone']}, freeze depth {best.params['freeze_depth']}")
    for name, metrics in (("best", best.test), ("ensemble", result.ensemble.test)):
        if metrics is not None:
            print(f"{name:>8}: test accuracy {metrics.accuracy:.4f}, macro F1 {metrics.macro_f1:.4f}, "
                  f"ECE {metrics.ece:.4f}")  # fmt: skip
    print(f"artifact: {result.artifact}\nreport:   {result.report}")

    predictor = result.predictor()
    image = next(p for p in sorted(Path(test or data).rglob("*")) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    prediction = predictor.predict([image], top_k=2)[0]
    print(f"{image.name}: {prediction.label} ({prediction.probability:.3f})")


if __name__ == "__main__":
    main()
