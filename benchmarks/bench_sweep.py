"""Sweep benchmarks: trial overhead, Ray Train vs a bare loop, the feature cache, accuracy, search efficiency.

Run from the repository root; each writes its figures to ``benchmarks/results/sweep_<name>.json``::

    .venv/bin/python benchmarks/bench_sweep.py overhead        # per-trial seconds outside training, per engine
    .venv/bin/python benchmarks/bench_sweep.py train_vs_bare   # Ray Train throughput / bare torch loop
    .venv/bin/python benchmarks/bench_sweep.py feature_cache   # frozen trial: cached features vs images
    .venv/bin/python benchmarks/bench_sweep.py accuracy        # 15-minute sweeps x 3 seeds, beside the LR probe
    .venv/bin/python benchmarks/bench_sweep.py efficiency      # TPE+ASHA vs random search without stopping
    .venv/bin/python benchmarks/bench_sweep.py pruning         # backbones ranked by LogME vs not, 2 decoys

They need ``../shared/datasets`` beside the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from automl_tl.train.memory import tune_malloc  # noqa: E402
from automl_tl.config import ExperimentConfig, load_config  # noqa: E402
from automl_tl.sweep.driver import run_search  # noqa: E402


def _write(name: str, figures: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch

    gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    figures = {"benchmark": name, "machine": f"{os.cpu_count()} CPUs, {gpus}", "date": time.strftime("%Y-%m-%d"), **figures}
    path = RESULTS / f"sweep_{name}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")


def _tiny(cache: Path, engine: str, trials: int, **space: Any) -> ExperimentConfig:
    base = {"backbones": ["mobilenetv2_100"], "image_sizes": [64], "max_epochs": 1, "batch_sizes": [32],
            "freeze_depths": [6], "augmentations": ["light"]}  # fmt: skip
    base.update(space)
    return load_config({
        "data": {"source": str(SHARED / "hymenoptera"), "cache_dir": str(cache)},
        "space": base,
        "search": {"num_samples": trials, "max_concurrent_trials": 1, "scheduler": "none", "time_budget_s": 3600},
        "resources": {"trial_engine": engine},
    })  # fmt: skip


def _train_seconds(run_dir: Path) -> list[float]:
    import pandas as pd

    per_trial = []
    for progress in (run_dir / "tune").glob("*/progress.csv"):
        frame = pd.read_csv(progress)
        per_trial.append(float(frame["epoch_s"].sum()))
    return per_trial


def bench_overhead(args: argparse.Namespace) -> None:
    """Per-trial seconds outside training, sequential trials: Ray Train per trial vs the inline engine."""
    figures: dict[str, Any] = {"trials": args.trials, "workload": "mobilenetv2_100 64px, freeze 6, light aug, 1 epoch, hymenoptera"}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for engine in ("train", "inline"):
            run_dir = Path(tmp) / engine
            started = time.perf_counter()
            run_search(_tiny(cache, engine, args.trials), run_dir, progress=False)
            sweep_s = time.perf_counter() - started
            train_s = _train_seconds(run_dir)
            overhead = (sweep_s - sum(train_s)) / args.trials
            figures[engine] = {
                "sweep_s": round(sweep_s, 2),
                "train_s_per_trial": round(float(np.mean(train_s)), 2),
                "overhead_s_per_trial": round(overhead, 2),
            }
    figures["before_after"] = f"{figures['train']['overhead_s_per_trial']} s -> {figures['inline']['overhead_s_per_trial']} s per trial"
    _write("overhead", figures)


def bench_train_vs_bare(args: argparse.Namespace) -> None:
    """Training throughput in a Ray Train worker vs the same loop in a bare process, same data and epochs."""
    import ray

    from automl_tl.sweep.trial import TrialSetup, _run_with_ray_train
    from automl_tl.train.loop import TrialConfig, train_trial
    from automl_tl.sweep.driver import prepare_data
    from automl_tl.runs.rundir import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        config = _tiny(Path(tmp) / "cache", "train", 1, max_epochs=args.epochs, image_sizes=[96], freeze_depths=[4])
        run = RunDir(Path(tmp) / "run")
        run.prepare()
        data = prepare_data(config, run, None, progress=False)
        params = {"backbone": "mobilenetv2_100", "freeze_depth": 4, "learning_rate": 1e-3, "backbone_lr_ratio": 0.1,
                  "augmentation": "light", "optimizer": "adamw", "weight_decay": 1e-4, "label_smoothing": 0.0,
                  "batch_size": 32, "max_epochs": args.epochs, "head": "linear", "head_dropout": 0.0,
                  "image_size": 96, "plateau_patience": 100}  # fmt: skip
        cfg = TrialConfig.from_params(params)
        n_images = len(data.train_idx) * args.epochs

        import torch

        torch.set_num_threads(1)
        bare_epochs: list[float] = []
        # The same work as a trial: the bare loop also writes its best epoch's model, as every trial does.
        train_trial(cfg, data, lambda m, d: bare_epochs.append(m["epoch_s"]), Path(tmp) / "bare")

        ray.init(num_cpus=2, log_to_driver=False)
        try:
            from ray import tune

            setup = TrialSetup(str(run.path), "train", config.resources)

            def trial(p: dict[str, Any]) -> None:
                _run_with_ray_train(TrialConfig.from_params(p), data, setup, run.path / "t", "bench")

            grid = tune.Tuner(tune.with_resources(trial, {"CPU": 0.001}), param_space=params,
                              run_config=tune.RunConfig(storage_path=str(run.path), name="tune", verbose=0)).fit()  # fmt: skip
            frame = grid[0].metrics_dataframe
            if frame is None:
                raise SystemExit(f"the Ray Train trial reported nothing: {grid[0].error}")
            ray_epochs = [float(v) for v in frame["epoch_s"]]
        finally:
            ray.shutdown()
    bare_ips, ray_ips = n_images / sum(bare_epochs), n_images / sum(ray_epochs)
    steady = len(data.train_idx) * (args.epochs - 1)
    _write("train_vs_bare", {
        "workload": f"mobilenetv2_100 96px, freeze 4, light aug, {args.epochs} epochs x {len(data.train_idx)} images "
                    "(+ validation each epoch), 1 thread, best epoch written to disk in both",
        "bare_images_per_s": round(bare_ips, 1), "ray_train_images_per_s": round(ray_ips, 1),
        "ratio": round(ray_ips / bare_ips, 3), "target": ">= 0.9",
        "epoch_s": {"bare": [round(x, 2) for x in bare_epochs], "ray_train": [round(x, 2) for x in ray_epochs]},
        "ratio_after_first_epoch": round((steady / sum(ray_epochs[1:])) / (steady / sum(bare_epochs[1:])), 3)
        if args.epochs > 1 else None,
    })  # fmt: skip


def bench_feature_cache(args: argparse.Namespace) -> None:
    """A frozen-backbone trial training its head on cached features vs on images through the frozen net."""
    from automl_tl.runs.rundir import RunDir
    from automl_tl.train.loop import TrialConfig, train_trial
    from automl_tl.sweep.driver import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        config = _tiny(Path(tmp) / "cache", "inline", 1, max_epochs=args.epochs, image_sizes=[160])
        run = RunDir(Path(tmp) / "run")
        run.prepare()
        data = prepare_data(config, run, None, progress=False)
        params = {"backbone": "mobilenetv2_100", "freeze_depth": 8, "learning_rate": 3e-3, "backbone_lr_ratio": 0.1,
                  "augmentation": "none", "optimizer": "adamw", "weight_decay": 1e-4, "label_smoothing": 0.0,
                  "batch_size": 32, "max_epochs": args.epochs, "head": "linear", "head_dropout": 0.0,
                  "image_size": 160, "plateau_patience": 100}  # fmt: skip
        cfg = TrialConfig.from_params(params)
        timings: dict[str, float] = {}
        accuracy: dict[str, float] = {}
        for label in ("first (computes the cache)", "cached"):
            started = time.perf_counter()
            last = train_trial(cfg, data, lambda m, d: None, None)
            timings[label] = time.perf_counter() - started
            accuracy[label] = float(last.metrics["val_accuracy"]) if last else float("nan")
        # Without the cache: the same frozen trial stepping through images every epoch.
        started = time.perf_counter()
        last = train_trial(cfg, data, lambda m, d: None, None, use_feature_cache=False)
        timings["without cache (images)"] = time.perf_counter() - started
        accuracy["without cache (images)"] = float(last.metrics["val_accuracy"]) if last else float("nan")
    speedup = timings["without cache (images)"] / timings["cached"]
    _write("feature_cache", {
        "workload": f"mobilenetv2_100 160px, whole extractor frozen, no augmentation, {args.epochs} epochs, hymenoptera",
        "seconds": {k: round(v, 2) for k, v in timings.items()}, "val_accuracy": accuracy,
        "speedup_cached_vs_images": round(speedup, 1), "target": ">= 10x",
    })  # fmt: skip


# Every registered backbone at its native input size; trials are not capped, so the time budget ends the sweep.
ACCURACY_SPACE: dict[str, Any] = {
    "backbones": ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_100"],
    "max_epochs": 6,
    "batch_sizes": [32],
}


TOP_KEYS = ("backbone", "freeze_depth", "augmentation", "optimizer", "feature_scale", "learning_rate", "best_val_accuracy", "epochs_run",
            "stop_reason", "wall_s", "feature_cache")  # fmt: skip

# name: (data, test data, test_fraction, issue 22's target test accuracy); animal-shapes runs the demo's sweep
ACCURACY_CASES: dict[str, tuple[str, str | None, float, float]] = {
    "hymenoptera": (str(SHARED / "hymenoptera" / "train"), str(SHARED / "hymenoptera" / "val"), 0.0, 0.97),
    "flowers5": (str(SHARED / "flowers5"), None, 0.2, 0.82),
    "animal-shapes": ("builtin:animal-shapes", None, 0.15, 0.975),
}


def _accuracy_config(name: str, budget_s: float, cache: Path, seed: int, space: dict[str, Any]) -> ExperimentConfig:
    """The benchmark's sweep: all four backbones and defaults otherwise; animal-shapes runs the demo's own."""
    data, _, test_fraction, _ = ACCURACY_CASES[name]
    if name == "animal-shapes":
        from automl_tl.demo import demo_config

        demo = demo_config(budget_s=budget_s)
        demo = demo.replace("space", **space)
        return demo.replace("data", cache_dir=str(cache), seed=seed).replace("search", num_samples=None, seed=seed)
    return load_config({
        "data": {"source": data, "cache_dir": str(cache), "test_fraction": test_fraction, "seed": seed},
        "space": {**ACCURACY_SPACE, **space},
        "search": {"time_budget_s": budget_s, "seed": seed},
    })  # fmt: skip


def _memory_fit(rows: list[dict[str, Any]], config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Each trial's measured peak against the memory it asked Ray for: the estimate must cover the peak."""
    from automl_tl.sweep.trial import trial_memory_bytes
    from automl_tl.train.loop import TrialConfig

    n_val = len(json.loads((run_dir / "data.json").read_text(encoding="utf-8"))["val"])
    fits = []
    for row in rows:
        if row.get("peak_rss_mb") is None:
            continue
        cfg = TrialConfig.from_params({**{k: v for k, v in row.items() if v is not None}, "max_epochs": 1})
        asked = trial_memory_bytes(cfg, config.resources, n_val, None) / 2**20
        trial = {k: row.get(k) for k in ("trial_id", "backbone", "freeze_depth", "image_size", "batch_size", "augmentation")}
        fits.append((row["peak_rss_mb"] / asked, row["peak_rss_mb"], asked, trial))
    if not fits:
        return {}
    worst = max(fits, key=lambda f: f[0])
    return {"trials_measured": len(fits), "max_peak_rss_mb": max(f[1] for f in fits),
            "trials_over_their_request": sum(f[0] > 1 for f in fits),
            "worst_peak_over_request": {"ratio": round(worst[0], 3), "peak_mb": worst[1], "asked_mb": round(worst[2]),
                                        "trial": worst[3]}}  # fmt: skip


def _probe_figures(run_dir: Path, config: ExperimentConfig) -> dict[str, Any]:
    """The plain frozen-backbone logistic-regression probe of each backbone on the sweep's own split.

    Trained on the train split, its L2 strength chosen on validation log loss, scored once on the test split:
    the baseline a transfer-learning sweep must not end below. ``chosen`` is the backbone whose probe did best
    on validation (a user without test labels would pick it); ``best_on_test`` is the stricter bar.
    """
    import torch

    from automl_tl.backbones import create_backbone, resolve_spec
    from automl_tl.inference.transforms import Preprocessing
    from automl_tl.runs.storage import local_data_cache
    from automl_tl.train.features import cached_features
    from automl_tl.train.probe import fit_probe, head_probs
    from automl_tl.train.trial_data import TrialData

    info = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    cache_path = local_data_cache(info)
    labels = np.asarray(info["labels"], dtype=np.int64)
    train, val, test = (np.asarray(info[s], dtype=np.int64) for s in ("train", "val", "test"))

    def split(train_idx: np.ndarray, val_idx: np.ndarray) -> TrialData:
        return TrialData(cache_path, str(info["data_id"]), tuple(info["class_names"]), train_idx, val_idx, labels,
                         str(Path(cache_path).parent / "features"))  # fmt: skip

    per_backbone: dict[str, Any] = {}
    for name in config.space.backbones:
        spec = resolve_spec(name)
        sizes = config.space.image_sizes or (spec.input_size,)
        pre = Preprocessing.from_spec(spec, sizes[0])
        model = create_backbone(name, num_classes=len(info["class_names"]), freeze_depth=spec.max_freeze_depth)
        fitted = cached_features(split(train, val), name, pre, model)
        test_x = cached_features(split(test, test[:0]), name, pre, model).train
        head = model.net.get_classifier()  # type: ignore[operator]
        fit = fit_probe(head, fitted.train, torch.from_numpy(labels[train]), fitted.val, labels[val])
        per_backbone[name] = {"image_size": pre.input_size, "l2": fit.l2,
                              "val_accuracy": hits(fit.val_probs, labels[val]),
                              "test_accuracy": hits(head_probs(head, test_x), labels[test])}  # fmt: skip
    chosen = max(per_backbone, key=lambda n: per_backbone[n]["val_accuracy"])
    return {"per_backbone": per_backbone, "chosen": {"backbone": chosen, **per_backbone[chosen]},
            "best_on_test": max(p["test_accuracy"] for p in per_backbone.values())}  # fmt: skip


def _cv_top(results: dict[str, Any], rows: list[dict[str, Any]], top: int = 8) -> dict[str, Any]:
    """The best cross-validated trials, each with what it was (backbone, optimizer, feature scale)."""
    scored = list(((results["selection"]["cross_validation"] or {}).get("trials") or {}).items())[:top]
    what = {r["trial_id"]: {k: r.get(k) for k in ("backbone", "optimizer", "feature_scale")} for r in rows}
    return {t: {**what.get(t, {}), **s} for t, s in scored}


def hits(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}  # fmt: skip


def bench_accuracy(args: argparse.Namespace) -> None:
    """Budget-bound sweeps (train -> test), seed by seed, each beside its logistic-regression probe."""
    from automl_tl._logs import log_to
    from automl_tl.evaluate.results import build_results

    switched = {"feature_scales": tuple(args.feature_scales)}  # the transfer methods this run switches on
    search = {"test_time_augmentation": args.tta}
    figures: dict[str, Any] = {"budget_s": args.budget_s, "seeds": list(args.seeds), "space": {**ACCURACY_SPACE, **switched},
                               "search": search,
                               "other_settings": "defaults; animal-shapes runs the demo's sweep at this budget"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for name in args.datasets:
            _, test, _, target = ACCURACY_CASES[name]
            runs = []
            for seed in args.seeds:
                run_dir = Path(tmp) / f"{name}-{seed}"
                config = _accuracy_config(name, args.budget_s, cache, seed, switched).replace("search", **search)
                started = time.perf_counter()
                with log_to(sys.stdout):  # the sweep's progress lines, as `automl-tl search` prints them
                    outcome = run_search(config, run_dir, test_source=test, progress=False)
                    results_started = time.perf_counter()
                    results = build_results(run_dir)  # cross-validation, refit, ensemble, test scores
                    results_s = time.perf_counter() - results_started
                summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
                probe = _probe_figures(run_dir, config)
                run = {
                    "seed": seed,
                    "wall_s": round(time.perf_counter() - started, 1),
                    "trials": len(outcome.rows),
                    "sweep": summary["sweep"],
                    "results_s": round(results_s, 1),  # after the sweep, outside its budget
                    "load_average_1_5_15min_at_end": [round(x, 1) for x in os.getloadavg()],
                    "selection": {k: v for k, v in results["selection"].items() if k != "cross_validation"},
                    "tta": ((results["selection"]["cross_validation"] or {}).get("tta") or {}),
                    "cross_validation_top": _cv_top(results, outcome.rows),
                    "best_trial": {k: results["best"]["config"].get(k) for k in ("backbone", "freeze_depth", "augmentation", "optimizer", "image_size", "feature_scale")},
                    "best_test_accuracy": results["best"]["test"]["accuracy"],
                    "ensemble_test_accuracy": results["ensemble"]["test"]["accuracy"],
                    "probe_test_accuracy": probe["chosen"]["test_accuracy"],
                    "probe": probe,
                    "n_test": results["best"]["test"]["n"],
                    "top_trials": [{k: r.get(k) for k in TOP_KEYS} for r in outcome.rows[:6]],
                    "memory": _memory_fit(outcome.rows, config, run_dir),
                }  # fmt: skip
                runs.append(run)
                print(f"[bench] {name} seed {seed}: best {run['best_test_accuracy']:.4f}, ensemble "
                      f"{run['ensemble_test_accuracy']:.4f}, probe {run['probe_test_accuracy']:.4f} "
                      f"(best probe on test {probe['best_on_test']:.4f}); {run['trials']} trials, "
                      f"{summary['sweep']['budget_used']:.0%} of the budget ({summary['sweep']['stop_reason']})")  # fmt: skip
            figures[name] = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "target_test_accuracy": target,
                "best_test_accuracy": _spread([r["best_test_accuracy"] for r in runs]),
                "ensemble_test_accuracy": _spread([r["ensemble_test_accuracy"] for r in runs]),
                "probe_test_accuracy": _spread([r["probe_test_accuracy"] for r in runs]),
                "budget_used": _spread([float(r["sweep"]["budget_used"] or 0.0) for r in runs]),
                "runs": runs,
                "conditions": "; ".join(filter(None, [args.conditions, "load averages (1, 5, 15 min) at each run's "
                                                      f"end: {[r['load_average_1_5_15min_at_end'] for r in runs]}"])),
            }
    earlier = RESULTS / f"sweep_{args.results_name}.json"
    if earlier.is_file():  # a run of some data sets keeps the others' last figures, each with its own date
        previous = json.loads(earlier.read_text(encoding="utf-8"))
        if previous.get("budget_s") == args.budget_s:
            figures.update({k: previous[k] for k in ACCURACY_CASES if k not in figures and k in previous})
    _write(args.results_name, figures)


def bench_efficiency(args: argparse.Namespace) -> None:
    """TPE + ASHA vs random search without early stopping, same number of trials, over several seeds."""
    methods = (("tpe_asha", "tpe", "asha"), ("random_no_stopping", "random", "none"))
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in methods}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for seed in args.seeds:
            for label, algorithm, scheduler in methods:
                config = load_config({
                    "data": {"source": str(SHARED / "hymenoptera"), "cache_dir": str(cache)},
                    "space": {"backbones": ["mobilenetv2_100"], "image_sizes": [96], "max_epochs": 4,
                              "batch_sizes": [32]},
                    "search": {"num_samples": args.trials, "algorithm": algorithm, "scheduler": scheduler, "frozen_first": False,
                               "time_budget_s": 3600, "seed": seed},
                })  # fmt: skip
                started = time.perf_counter()
                outcome = run_search(config, Path(tmp) / f"{label}-{seed}", progress=False)
                runs[label].append({
                    "seed": seed,
                    "best_val_accuracy": round(float(outcome.best["best_val_accuracy"]), 4),
                    "trial_epochs": int(sum(r["epochs_run"] for r in outcome.rows)),
                    "wall_s": round(time.perf_counter() - started, 1),
                })  # fmt: skip
    figures: dict[str, Any] = {"trials_per_search": args.trials, "seeds": list(args.seeds),
                               "data": "hymenoptera train -> its given val split (153 images)"}  # fmt: skip
    for label, rows in runs.items():
        figures[label] = {
            "mean_best_val_accuracy": round(float(np.mean([r["best_val_accuracy"] for r in rows])), 4),
            "total_trial_epochs": int(sum(r["trial_epochs"] for r in rows)),
            "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
            "runs": rows,
        }
    _write("efficiency", figures)


# Decoys: timm architectures whose "pretrained" weights are written from a random init into the weights folder
# ($AUTOML_TL_WEIGHTS_DIR), the loading path a hub backbone's file takes. Small, so an arm that fine-tunes
# them does not spend its time on their size.
DECOYS = ("resnet10t.c3_in1k", "mobilenetv3_small_050.lamb_in1k")


def _decoy_weights(folder: Path) -> list[str]:
    """Write the decoys' random-init weights to ``folder``, link the registered backbones' fetched files beside
    them, and point ``$AUTOML_TL_WEIGHTS_DIR`` there (before Ray starts, so its workers read it too)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from automl_tl.backbones import weights_dir

    fetched = weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for existing in fetched.iterdir() if fetched.is_dir() else ():
        (folder / existing.name).symlink_to(existing)
    torch.manual_seed(0)
    for arch in DECOYS:
        net = timm.create_model(arch, pretrained=False)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / f"{arch}.safetensors"))
    os.environ["AUTOML_TL_WEIGHTS_DIR"] = str(folder)
    return [f"timm:{arch}" for arch in DECOYS]


def _in_proposal_order(rows: list[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """The rows in the order the searcher proposed their trials: Tune names each trial's folder
    ``<trainable>_<trial id>_<proposal number>_<params>``."""
    import re

    names = [folder.name for folder in (run_dir / "tune").iterdir()]

    def number(row: dict[str, Any]) -> int:
        pattern = re.compile(rf"_{re.escape(str(row['trial_id']))}_(\d+)_")
        return next(int(m.group(1)) for name in names if (m := pattern.search(name)))

    return sorted(rows, key=number)


def _steps_through_images(row: dict[str, Any]) -> bool:
    """Whether a leaderboard row's trial trains on images (fine-tuning, or augmented) rather than on cached features."""
    from automl_tl.train.loop import TrialConfig

    return not TrialConfig.from_params({**{k: v for k, v in row.items() if v is not None}, "max_epochs": 1}).frozen_features


def epochs_to_reach(rows: list[dict[str, Any]], target: float) -> int | None:
    """Trial-epochs spent, trials taken in the order given (proposed), until a trial's best epoch reached
    ``target`` validation accuracy: every epoch of the trials before it, plus its epochs up to its best one."""
    spent = 0
    for row in rows:
        accuracy = row.get("best_val_accuracy")
        if accuracy is not None and float(accuracy) >= target - 1e-9:
            return spent + int(row.get("best_epoch") or row.get("epochs_run") or 0)
        spent += int(row.get("epochs_run") or 0)
    return None


def _pruning_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One data set's figures over the seeds run so far: the spread of each measure per arm, and the saving."""
    per_arm = {arm: {key: _spread([float(r[arm][key]) for r in runs if r[arm][key] is not None])
                     for key in ("epochs_to_best", "epochs_to_common_best", "trial_epochs", "best_val_accuracy",
                                 "best_test_accuracy", "ensemble_test_accuracy")}
               for arm in ("on", "off")}  # fmt: skip
    off_epochs, on_epochs = per_arm["off"]["epochs_to_best"]["mean"], per_arm["on"]["epochs_to_best"]["mean"]
    return {
        "seeds_run": [r["seed"] for r in runs],
        "no_decoy_image_trial_with_ranking": all(r["on"]["decoy_image_trials"] == 0 for r in runs),
        "epochs_to_best_saved": round(1 - on_epochs / off_epochs, 3) if off_epochs else None,
        **per_arm,
        "runs": runs,
    }


def _pruning_arm(config: ExperimentConfig, run_dir: Path, test: str | None, decoys: list[str],
                 backbones: list[str]) -> dict[str, Any]:  # fmt: skip
    """One sweep (ranking on or off) and its results: trial-epochs to the best, decoy image trials, test accuracy."""
    from automl_tl.evaluate.results import build_results

    started = time.perf_counter()
    outcome = run_search(config, run_dir, test_source=test, progress=False)
    sweep_s = time.perf_counter() - started
    results = build_results(run_dir)  # cross-validation, refit, ensemble, test scores
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    rows = _in_proposal_order(outcome.rows, run_dir)
    image_trials = [r for r in rows if _steps_through_images(r)]
    return {
        "sweep_s": round(sweep_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_1_5_15min_at_end": [round(v, 1) for v in os.getloadavg()],
        "best_val_accuracy": float(outcome.best["best_val_accuracy"]),
        "epochs_to_best": epochs_to_reach(rows, float(outcome.best["best_val_accuracy"])),
        "trial_epochs": int(sum(int(r.get("epochs_run") or 0) for r in rows)),
        "decoy_image_trials": sum(r["backbone"] in decoys for r in image_trials),
        "image_trials": {b: sum(r["backbone"] == b for r in image_trials) for b in backbones},
        "best_test_accuracy": results["best"]["test"]["accuracy"],
        "ensemble_test_accuracy": results["ensemble"]["test"]["accuracy"],
        "best_trial": {k: outcome.best.get(k) for k in ("backbone", "freeze_depth", "augmentation")},
        "transferability": summary["transferability"],
        "rows": [{k: r.get(k) for k in ("trial_id", "backbone", "freeze_depth", "augmentation",
                                        "best_val_accuracy", "best_epoch", "epochs_run", "feature_cache")}
                 for r in rows],
    }  # fmt: skip


def bench_pruning(args: argparse.Namespace) -> None:
    """The four registered backbones plus two random-init decoys, ranking on against off, seed by seed.

    The results file is rewritten after every seed, merged with the seeds earlier invocations wrote (a seed run
    again replaces its old figures), so a run cut short, or data sets and seeds run one at a time, lose nothing.
    """
    from automl_tl.backbones import list_backbones

    path = RESULTS / f"sweep_{args.results_name}.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    settings = {"trials": args.trials, "max_epochs": args.max_epochs, "image_size": args.image_size or "each backbone's own"}
    if earlier and earlier.get("settings") != settings:
        raise SystemExit(f"{path} holds runs with other settings ({earlier.get('settings')}): pass another --results-name")
    figures: dict[str, Any] = {
        "settings": settings, "decoys": list(DECOYS), "concurrency": 1,
        "target": "no decoy image trial with ranking on; >= 30 % fewer trial-epochs to the best validation "
                  "accuracy; test accuracy within noise",
        **{name: earlier[name] for name in ACCURACY_CASES if name in earlier},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        decoys = _decoy_weights(Path(tmp) / "weights")
        backbones = [*list_backbones(), *decoys]
        cache = Path(tmp) / "cache"
        for name in args.datasets:
            data, test, test_fraction, _ = ACCURACY_CASES[name]
            runs = {r["seed"]: r for r in figures.get(name, {}).get("runs", [])}
            for seed in args.seeds:
                arms: dict[str, Any] = {}
                for arm in ("on", "off"):
                    config = load_config({
                        "data": {"source": data, "cache_dir": str(cache), "test_fraction": test_fraction, "seed": seed},
                        "space": {"backbones": backbones, "max_epochs": args.max_epochs, "batch_sizes": [32],
                                  "image_sizes": [args.image_size] if args.image_size else []},
                        "search": {"num_samples": args.trials, "max_concurrent_trials": 1, "time_budget_s": 24 * 3600,
                                   "seed": seed, "rank_backbones": arm},
                    })  # fmt: skip
                    arms[arm] = _pruning_arm(config, Path(tmp) / f"{name}-{seed}-{arm}", test, decoys, backbones)
                common = min(arms["on"]["best_val_accuracy"], arms["off"]["best_val_accuracy"])
                for figures_of_arm in arms.values():  # the same bar for both: the lower of the two bests
                    figures_of_arm["epochs_to_common_best"] = epochs_to_reach(figures_of_arm["rows"], common)
                runs[seed] = {"seed": seed, "date": time.strftime("%Y-%m-%d %H:%M"), **arms}
                figures[name] = _pruning_summary([runs[s] for s in sorted(runs)])
                _write(args.results_name, figures)
                print(f"[bench] {name} seed {seed}: epochs to best on {arms['on']['epochs_to_best']} / off "
                      f"{arms['off']['epochs_to_best']}; test on {arms['on']['best_test_accuracy']:.4f} / off "
                      f"{arms['off']['best_test_accuracy']:.4f}; decoy image trials on {arms['on']['decoy_image_trials']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--trials", type=int, default=4)
    p = sub.add_parser("train_vs_bare")
    p.add_argument("--epochs", type=int, default=5)
    p = sub.add_parser("feature_cache")
    p.add_argument("--epochs", type=int, default=5)
    p = sub.add_parser("accuracy")
    p.add_argument("--budget-s", type=float, default=900.0, dest="budget_s")
    p.add_argument("--datasets", nargs="+", default=list(ACCURACY_CASES), choices=list(ACCURACY_CASES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--results-name", default="accuracy", dest="results_name",
                   help="results file sweep_<name>.json (e.g. accuracy_smoke)")
    p.add_argument("--feature-scales", type=float, nargs="+", default=[1.0], dest="feature_scales",
                   help="space.feature_scales: 1.0 1.25 also probes each backbone at 1.25 times its input size")
    p.add_argument("--tta", action="store_true", help="search.test_time_augmentation: flip, chosen on the folds")
    p.add_argument("--conditions", default="", help="what else ran on the machine meanwhile, for the results file")
    p = sub.add_parser("efficiency")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p = sub.add_parser("pruning")
    p.add_argument("--datasets", nargs="+", default=["hymenoptera", "flowers5"], choices=["hymenoptera", "flowers5"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--max-epochs", type=int, default=4, dest="max_epochs")
    p.add_argument("--image-size", type=int, default=None, dest="image_size", help="one size for every backbone")
    p.add_argument("--results-name", default="pruning", dest="results_name",
                   help="results file sweep_<name>.json (e.g. pruning_smoke)")
    args = parser.parse_args()
    {"overhead": bench_overhead, "train_vs_bare": bench_train_vs_bare, "feature_cache": bench_feature_cache,
     "accuracy": bench_accuracy, "efficiency": bench_efficiency, "pruning": bench_pruning}[args.name](args)  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tune_malloc()  # as the CLI does: the bare loops here and the Ray workers they are compared with alike
    main()
