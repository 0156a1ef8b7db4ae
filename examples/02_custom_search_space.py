"""Search with a custom search space from YAML (02_custom_search_space.yaml beside this file).

    .venv/bin/python examples/02_custom_search_space.py path/to/images --out runs/custom
    .venv/bin/python examples/02_custom_search_space.py --smoke-test

The same file works with the CLI: ``automl-tl search --data DIR --config examples/02_custom_search_space.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import automl_tl

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="labelled image folder")
    parser.add_argument("--out", default="runs/custom")
    parser.add_argument("--smoke-test", action="store_true", help="validate the YAML and run two tiny trials")
    args = parser.parse_args()

    config = automl_tl.load_config(HERE / "02_custom_search_space.yaml")  # a bad key fails here, named
    print(f"space: {len(config.space.backbones)} backbones, freeze depths {list(config.space.freeze_depths)}, "
          f"augmentations {list(config.space.augmentations)}, {config.search.num_samples} trials, "
          f"{config.search.scheduler} scheduler")  # fmt: skip
    data = args.data
    if args.smoke_test:
        data = str(SHARED / "hymenoptera")
        config = config.replace("space", backbones=("mobilenetv2_100",), image_sizes=(64,), freeze_depths=(8,),
                                augmentations=("none",), max_epochs=1)  # fmt: skip
        config = config.replace("search", num_samples=2, time_budget_s=120.0, ensemble_size=2)
    if not data:
        parser.error("give a labelled image folder (or --smoke-test)")
    result = automl_tl.search(data, args.out, config=config, report=False)
    for row in result.leaderboard:
        print(f"{row.rank:>2} {row.trial_id} {row.params['backbone']:<22} freeze {row.params['freeze_depth']} "
              f"{row.params['augmentation']:<6} val_acc {row.val_accuracy}")  # fmt: skip


if __name__ == "__main__":
    main()
