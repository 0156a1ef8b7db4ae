"""``automl-tl demo``: the whole product on real images in minutes, on a laptop, with no network.

    automl-tl demo [--data DIR] [--out RUN_DIR] [--keep-serving]

It sweeps two pretrained backbones over freeze depths, learning rates and augmentations on the built-in
animal-shapes set (or ``--data``), prints the leaderboard and the test metrics of the best trial and the
ensemble, trains the best configuration again from random initialisation for the same number of epochs to
show what pretraining buys, writes the report, serves the ensemble over HTTP on 127.0.0.1 and sends it a few
held-out images, then stops (or keeps serving with ``--keep-serving``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automl_tl.config import ExperimentConfig, load_config
from automl_tl.runs.rundir import RunDir

if TYPE_CHECKING:
    from automl_tl.evaluate.outcome import LeaderboardRow

__all__ = ["demo_config", "run_demo", "random_init_baseline"]

DEMO_BUDGET_S = 360.0

logger = logging.getLogger(__name__)
_DEMO = {"stage": "demo"}


def demo_config(data: str | None = None, budget_s: float = DEMO_BUDGET_S) -> ExperimentConfig:
    """A sweep sized for 2 CPU cores: small images, a handful of short trials, a hard time budget."""
    return load_config(
        {
            "data": {"source": data or "builtin:animal-shapes"},
            "space": {
                "backbones": ["tf_efficientnet_lite0", "mobilenetv2_100"],
                "image_sizes": [64],
                "freeze_depths": [5, 6, 7, 8],
                "augmentations": ["none", "light"],
                "learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                "batch_sizes": [64],
                "max_epochs": 3,
            },
            "search": {"time_budget_s": budget_s, "ensemble_size": 3, "grace_period_epochs": 1},
        }
    )


def random_init_baseline(run_dir: Path, best: LeaderboardRow) -> float | None:
    """Test accuracy of the best trial's configuration trained from random weights in the same budget.

    The budget is the best trial's own: its epochs, and no more wall-clock time than it took.
    """
    from automl_tl.train.loop import TrialConfig, train_trial
    from automl_tl.train.trial_data import TrialData

    run = RunDir(run_dir)
    data_info = run.read_json("data.json")
    if not data_info["test"]:
        return None
    trial = run.read_json(f"trials/{best.trial_id}/trial.json")
    epochs = int(best.epochs_run or trial["max_epochs"])
    cfg = TrialConfig.from_params({**trial, "pretrained": False, "max_epochs": epochs, "freeze_depth": 0, "plateau_patience": 1000})
    labels = np.asarray(data_info["labels"], dtype=np.int64)
    test_idx = np.asarray(data_info["test"], dtype=np.int64)
    data = TrialData(
        cache_path=data_info["cache_path"],
        data_id=data_info["data_id"],
        class_names=tuple(data_info["class_names"]),
        train_idx=np.asarray(data_info["train"], dtype=np.int64),
        val_idx=test_idx,  # scored on the same held-out test images as the sweep's models
        labels=labels,
        feature_cache_dir=str(Path(data_info["cache_path"]).parent / "features"),
    )
    budget_s = max(30.0, best.wall_s)
    logger.info(f"training {cfg.backbone} from random initialisation (everything trainable) for up to "
                f"{epochs} epoch(s) or {budget_s:.0f}s, the best trial's budget", extra={"stage": "baseline"})  # fmt: skip
    last: dict[str, Any] = {}
    train_trial(cfg, data, lambda metrics, ckpt: last.update(metrics), None, max_seconds=budget_s)
    return float(last.get("val_accuracy", float("nan")))


def run_demo(
    data: str | None,
    out: Path,
    keep_serving: bool,
    budget_s: float = DEMO_BUDGET_S,
    progress: bool = True,
    port: int = 8000,
) -> dict[str, Any]:
    from automl_tl.api import run_pipeline
    from automl_tl.serve import check_port

    check_port("127.0.0.1", port)  # now, not after the sweep
    started = time.time()
    config = demo_config(data, budget_s)
    logger.info(f"data: {config.data.source}; run directory: {out}; sweep budget {budget_s:.0f}s", extra=_DEMO)
    result = run_pipeline(out, config, progress=progress)
    logger.info("leaderboard:\n" + _leaderboard(result.leaderboard), extra=_DEMO)
    baseline = random_init_baseline(out, result.leaderboard[0])
    best_test = result.best.test.accuracy if result.best.test else None
    ens_test = result.ensemble.test.accuracy if result.ensemble.test else None
    if baseline is not None and best_test is not None:
        logger.info(f"test accuracy: pretrained best {best_test:.4f}, ensemble {ens_test:.4f}, "
                    f"same backbone from random init {baseline:.4f}", extra=_DEMO)  # fmt: skip
    summary = {"best_test_accuracy": best_test, "ensemble_test_accuracy": ens_test, "random_init_test_accuracy": baseline}
    RunDir(out).write_json("demo.json", {**summary, "wall_s": round(time.time() - started, 1)})
    _serve_and_query(out, keep_serving, port)
    logger.info(f"done in {time.time() - started:.0f}s", extra={**_DEMO, **summary})
    return summary


def _one_per_class(rows: list[int], labels: list[int], n_images: int) -> list[int]:
    """Held-out rows of up to ``n_images`` different classes, picked with a fixed seed: a varied sample."""
    first: dict[int, int] = {}
    for row in rows:
        first.setdefault(int(labels[int(row)]), int(row))
    classes = np.random.default_rng(0).permutation(sorted(first))[:n_images]
    return [first[int(c)] for c in classes]


def _leaderboard(rows: Sequence[LeaderboardRow], limit: int = 10) -> str:
    head = f"{'rank':>4}  {'trial':<9}{'backbone':<23}{'freeze':>6}  {'aug':<7}{'lr':>9}  {'val_acc':>7}  {'epochs':>6}  stop"
    lines = [head]
    for r in rows[:limit]:
        acc, p = r.val_accuracy, r.params
        lines.append(
            f"{r.rank:>4}  {r.trial_id:<9}{str(p['backbone']):<23}{str(p['freeze_depth']):>6}  {str(p['augmentation']):<7}"
            f"{float(p['learning_rate'] or 0):>9.2e}  {(f'{acc:.4f}' if acc is not None else '-'):>7}  {r.epochs_run:>6}  {r.stop_reason}"
        )
    return "\n".join(lines)


def _serve_and_query(out: Path, keep_serving: bool, port: int, n_images: int = 5) -> None:
    import urllib.request

    from automl_tl.serve import start_server, stop_server

    from automl_tl.data import Dataset

    run = RunDir(out)
    data_info = run.read_json("data.json")
    rows = _one_per_class(data_info["test"] or data_info["val"], data_info["labels"], n_images)
    images = Dataset.open(data_info["cache_path"])
    url = start_server(out, mode="ensemble", host="127.0.0.1", port=port)
    logger.info(f"serving the ensemble at {url} (page: {url}/ , API docs: {url}/docs)", extra={**_DEMO, "url": url})
    try:
        from PIL import Image

        for i in rows:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(images.image(int(i)))).save(buf, format="PNG")
            body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()
            request = urllib.request.Request(f"{url}/v1/predict?top_k=1", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            top = answer["predictions"][0]
            truth = data_info["class_names"][data_info["labels"][int(i)]]
            logger.info(f"POST /v1/predict -> {top['labels'][0]} ({top['probabilities'][0]:.3f}); true label: {truth}",
                        extra={**_DEMO, "label": top["labels"][0], "true_label": truth})  # fmt: skip
        if keep_serving:
            logger.info(f"serving at {url} until Ctrl-C; open {url}/ in a browser to drop an image", extra=_DEMO)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_server()
