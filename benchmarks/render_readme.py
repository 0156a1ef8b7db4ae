"""Render benchmarks/README.md from the figures the benchmarks wrote to benchmarks/results/*.json.

    .venv/bin/python benchmarks/render_readme.py            # rewrite benchmarks/README.md
    .venv/bin/python benchmarks/render_readme.py --check    # exit 1 if the committed page is stale

The page is never edited by hand: a benchmark run writes its JSON, this script turns every file into a table
of its key figures with the date and machine the file records, and tests/test_readme.py fails when the
committed page differs from what the committed results render. A file this script has no table for still
appears, as the list of its numbers, so a new benchmark is never left off the page.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
MISSING = "-"

Figures = Mapping[str, Any]


# --- formatting ------------------------------------------------------------------------------------------------


def get(figures: Any, path: str) -> Any:
    """``figures["a"]["b"]`` for ``"a.b"``; None where any step is missing (an older file lacks a key)."""
    for key in path.split("."):
        if not isinstance(figures, Mapping) or key not in figures:
            return None
        figures = figures[key]
    return figures


def fmt(value: Any) -> str:
    """A table cell: numbers rounded to what a benchmark on a shared machine can tell apart."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}".rstrip("0").rstrip(".") or "0"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def machine(figures: Figures) -> str:
    found = figures.get("machine")
    if isinstance(found, Mapping):
        parts = [f"{found['cpus']} CPUs" if "cpus" in found else None, found.get("platform"),
                 f"Python {found['python']}" if "python" in found else None]  # fmt: skip
        return ", ".join(p for p in parts if p) or MISSING
    devices = figures.get("devices")
    if isinstance(devices, Mapping):
        names = devices.get("names") or []
        return f"{devices.get('gpus', 0)} GPU(s): {', '.join(names)}" if names else "no GPU"
    return fmt(found)


def provenance(name: str, figures: Figures) -> str:
    date = figures.get("date") or figures.get("started")
    when = f"measured {date}" if date else "measured (date not recorded)"
    return f"From [`results/{name}`](results/{name}), {when} on {machine(figures)}."


def ratio(value: Any, unit: str = "x") -> str:
    return MISSING if value is None else f"{fmt(value)}{unit}"


# --- one table per benchmark -----------------------------------------------------------------------------------


def render_data(f: Figures) -> list[str]:
    passes = (("plain PIL decode loop", "plain_pil_loop"), ("first validate-and-cache pass", "first_pass"),
              ("first pass, 1 decode thread", "first_pass_1_thread"), ("cached re-load", "cached_reload"))  # fmt: skip
    lines = [f"{fmt(f.get('images'))} images of `{Path(str(f.get('data'))).name}`, the median of "
             f"{fmt(f.get('repeats'))} interleaved runs.", ""]  # fmt: skip
    lines += table(["pass", "seconds", "images/s"],
                   [(label, get(f, f"{key}.seconds"), get(f, f"{key}.images_per_s")) for label, key in passes])  # fmt: skip
    lines += [""] + table(["ratio", "measured", "target"], [
        ("cached re-load vs first pass", ratio(f.get("reload_speedup_vs_first_pass")),
         f">= {fmt(get(f, 'targets.reload_speedup_at_least'))}x"),
        ("first pass vs plain PIL loop (time)", ratio(f.get("first_pass_vs_plain_pil")),
         f"<= {fmt(get(f, 'targets.first_pass_vs_plain_pil_at_most'))}x"),
    ])  # fmt: skip
    return lines


def render_sweep_overhead(f: Figures) -> list[str]:
    lines = [f"{fmt(f.get('trials'))} trials of {fmt(f.get('workload'))}: seconds per trial spent outside training.", ""]
    engines = [key for key, value in f.items() if isinstance(value, Mapping) and "overhead_s_per_trial" in value]
    return lines + table(["trial engine", "sweep s", "training s per trial", "overhead s per trial"],
                         [(e, get(f, f"{e}.sweep_s"), get(f, f"{e}.train_s_per_trial"),
                           get(f, f"{e}.overhead_s_per_trial")) for e in engines])  # fmt: skip


def render_sweep_train_vs_bare(f: Figures) -> list[str]:
    return [f"{fmt(f.get('workload'))}.", ""] + table(["loop", "images/s"], [
        ("bare torch loop", f.get("bare_images_per_s")), ("Ray Train", f.get("ray_train_images_per_s")),
    ]) + ["", f"Ray Train / bare: {ratio(f.get('ratio'))} (after the first epoch "
          f"{ratio(f.get('ratio_after_first_epoch'))}); target {fmt(f.get('target'))}."]  # fmt: skip


def render_sweep_feature_cache(f: Figures) -> list[str]:
    seconds = f.get("seconds") or {}
    return [f"{fmt(f.get('workload'))}.", ""] + table(["run", "seconds", "val accuracy"], [
        (run, s, get(f, "val_accuracy").get(run) if get(f, "val_accuracy") else None) for run, s in seconds.items()
    ]) + ["", f"Cached features vs images: {ratio(f.get('speedup_cached_vs_images'))} faster; "
          f"target {fmt(f.get('target'))}."]  # fmt: skip


def render_sweep_accuracy(f: Figures) -> list[str]:
    """One row per sweep: its seed, how much of the budget it used, and its test accuracy beside the probe's."""
    sets = [key for key, value in f.items() if isinstance(value, Mapping) and "best_test_accuracy" in value]
    lines = [f"Sweeps of {fmt(f.get('budget_s'))} s over {fmt(get(f, 'space.backbones'))}, "
             f"other settings {fmt(f.get('other_settings'))}. The probe is the frozen-backbone logistic "
             "regression on the same split (the backbone it chose on validation).", ""]  # fmt: skip
    rows = []
    for name in sets:
        entry = f[name]
        for run in entry.get("runs") or [{**entry, "seed": None, "probe_test_accuracy": None}]:
            sweep = run.get("sweep") or {}
            best = run.get("best_trial") or {}
            rows.append((name, entry.get("date"), run.get("seed"), run.get("trials"), sweep.get("budget_used"),
                         sweep.get("stop_reason"), f"{fmt(best.get('backbone'))}, freeze {fmt(best.get('freeze_depth'))}",
                         run.get("best_test_accuracy"), run.get("ensemble_test_accuracy"), run.get("probe_test_accuracy"),
                         run.get("n_test"), f">= {fmt(entry.get('target_test_accuracy'))}"))  # fmt: skip
    lines += table(["data", "run", "seed", "trials", "budget used", "stop", "best trial", "best test acc",
                    "ensemble test acc", "probe test acc", "test images", "target"], rows)  # fmt: skip
    return lines


def render_sweep_efficiency(f: Figures) -> list[str]:
    methods = [key for key, value in f.items() if isinstance(value, Mapping) and "runs" in value]
    lines = [f"{fmt(f.get('trials_per_search'))} trials per search, seeds {fmt(f.get('seeds'))}; "
             f"{fmt(f.get('data'))}.", ""]  # fmt: skip
    lines += table(["search", "mean best val acc", "trial-epochs", "wall s"],
                   [(m, get(f, f"{m}.mean_best_val_accuracy"), get(f, f"{m}.total_trial_epochs"),
                     get(f, f"{m}.total_wall_s")) for m in methods])  # fmt: skip
    lines += [""] + table(["search", "seed", "best val acc", "trial-epochs", "wall s"],
                          [(m, r.get("seed"), r.get("best_val_accuracy"), r.get("trial_epochs"), r.get("wall_s"))
                           for m in methods for r in get(f, f"{m}.runs")])  # fmt: skip
    return lines


def render_sweep_pruning(f: Figures) -> list[str]:
    """Ranking on against off, per data set and seed: decoy image trials, trial-epochs to the best, test accuracy."""
    sets = [key for key, value in f.items() if isinstance(value, Mapping) and "runs" in value]
    lines = [f"The four registered backbones and the random-init decoys {fmt(f.get('decoys'))}; "
             f"{fmt(get(f, 'settings.trials'))} trials of at most {fmt(get(f, 'settings.max_epochs'))} epochs, "
             f"one at a time. Target: {fmt(f.get('target'))}.", ""]  # fmt: skip
    lines += table(["data", "seeds", "no decoy image trial (on)", "trial-epochs to best on / off", "saved",
                    "best test acc on / off"],
                   [(name, get(f, f"{name}.seeds_run"), get(f, f"{name}.no_decoy_image_trial_with_ranking"),
                     f"{fmt(get(f, f'{name}.on.epochs_to_best.mean'))} / {fmt(get(f, f'{name}.off.epochs_to_best.mean'))}",
                     get(f, f"{name}.epochs_to_best_saved"),
                     f"{fmt(get(f, f'{name}.on.best_test_accuracy.mean'))} / "
                     f"{fmt(get(f, f'{name}.off.best_test_accuracy.mean'))}") for name in sets])  # fmt: skip
    rows = []
    for name in sets:
        for run in get(f, f"{name}.runs"):
            rows += [(name, run.get("seed"), arm, get(run, f"{arm}.decoy_image_trials"), get(run, f"{arm}.epochs_to_best"),
                      get(run, f"{arm}.epochs_to_common_best"), get(run, f"{arm}.trial_epochs"),
                      get(run, f"{arm}.best_val_accuracy"), get(run, f"{arm}.best_test_accuracy"),
                      get(run, f"{arm}.wall_s")) for arm in ("on", "off")]  # fmt: skip
    lines += [""] + table(["data", "seed", "ranking", "decoy image trials", "trial-epochs to best",
                           "to the lower best", "trial-epochs", "best val acc", "best test acc", "wall s"], rows)
    return lines


def render_preflight(f: Figures) -> list[str]:
    cases = [key for key, value in f.items() if isinstance(value, Mapping) and "median_wall_s" in value]
    lines = [f"`{fmt(f.get('command'))}`, {fmt(f.get('repeats'))} runs per case. Target: {fmt(f.get('target'))}.", ""]
    lines += table(["offline machine", "median wall s", "max wall s", "exit codes", "load average at end"],
                   [(c, get(f, f"{c}.median_wall_s"), get(f, f"{c}.max_wall_s"), get(f, f"{c}.exit_codes"),
                     get(f, f"{c}.load_average_1_5_15min_at_end")) for c in cases])  # fmt: skip
    return lines


SERVE_KEYS = ("benchmark", "started", "wall_s", "smoke_test", "machine", "setup", "in_process", "in_process_runs",
              "serve", "deployments", "checks", "ensemble_layouts", "ingress_haproxy_vs_python_proxy",
              "best_vs_ensemble")  # fmt: skip


def render_serve(f: Figures) -> list[str]:
    lines = [f"Setup: {fmt(get(f, 'setup.artifact'))}; {fmt(get(f, 'setup.clients'))} clients, "
             f"{fmt(get(f, 'setup.requests'))}; {fmt(get(f, 'setup.replicas'))}.", ""]  # fmt: skip
    lines += ["Targets, each deployment against the same models in-process:", ""]
    lines += [f"- {'met' if ok else 'not met'}: {fmt(check)}" for check, ok in (f.get("checks") or {}).items()]
    runs = f.get("serve") or {}
    deployments = f.get("deployments") or {}
    lines += ["", "Each run under load and for lone requests:", ""]
    lines += table(["run", "mode", "layout", "replicas x threads", "lanes", "ingress", "img/s", "p50 ms", "p99 ms",
                    "lone p50 ms", "errors / requests", "mean batch", "memory first / last sixth MB"],
                   [(name, r.get("mode"), r.get("layout"),
                     f"{fmt(r.get('replicas'))} x {fmt(r.get('threads_per_replica'))}",
                     r.get("forward_lanes") or get(deployments, f"{name}.forward_lanes"),
                     r.get("ingress"), get(r, "load.throughput_img_s"), get(r, "load.p50_ms"), get(r, "load.p99_ms"),
                     get(r, "single_request.p50_ms"),
                     f"{fmt(get(r, 'load.errors'))} / {fmt(get(r, 'load.requests'))}", get(r, "load.mean_batch_size"),
                     f"{fmt(get(r, 'load.memory.first_sixth_peak_mb'))} / {fmt(get(r, 'load.memory.last_sixth_peak_mb'))}")
                    for name, r in runs.items()])  # fmt: skip
    lines += ["", "Serve against the in-process reference (the fastest in-process figure of the runs before and "
              "after the Serve runs):", ""]
    lines += table(["run", "throughput vs in-process", "lone p50 ms", "over the fastest in-process forward ms"],
                   [(name, ratio(d.get("throughput_ratio")), d.get("single_request_p50_ms"),
                     d.get("over_fastest_forward_ms")) for name, d in deployments.items()])  # fmt: skip
    reference = f.get("in_process") or {}
    lines += ["", "In-process reference (the `Predictor` on the same files):", ""]
    lines += table(["mode", "threads", "img/s (decode + forward)", "forward batch 1 ms", "forward batch 8 ms"],
                   [(mode, threads.removeprefix("threads_"), get(reference, f"{mode}.{threads}.throughput_img_s"),
                     get(reference, f"{mode}.{threads}.forward_ms_batch1"),
                     get(reference, f"{mode}.{threads}.forward_ms_batch8"))
                    for mode in reference for threads in reference[mode] if threads.startswith("threads_")])  # fmt: skip
    comparisons = [("ensemble layouts", "ensemble_layouts"), ("ingress", "ingress_haproxy_vs_python_proxy"),
                   ("best vs ensemble", "best_vs_ensemble")]  # fmt: skip
    rows = [(label, leaf, value) for label, key in comparisons for leaf, value in leaves(f.get(key))]
    if rows:
        lines += ["", "Comparisons within the run:", ""] + table(["comparison", "figure", "value"], rows)
    return lines


SERVE_AB_KEYS = ("benchmark", "started", "wall_s", "smoke_test", "machine", "setup", "mechanisms", "after_verdicts")


def render_serve_ab(f: Figures) -> list[str]:
    lines = [f"Deployment: {fmt(get(f, 'setup.deployment'))}; {fmt(get(f, 'setup.clients'))} clients, "
             f"{fmt(get(f, 'setup.load_s'))} s of load and {fmt(get(f, 'setup.lone_requests'))} lone requests per "
             f"round, rounds {fmt(get(f, 'setup.rounds'))} with the mechanism on or off. Rule: "
             f"{fmt(get(f, 'setup.rule'))}.", ""]  # fmt: skip
    mechanisms = f.get("mechanisms") or {}

    def per_round(m: Figures, state: str, key: str) -> str:
        return " / ".join(fmt(r.get(key)) for r in m.get("rounds") or [] if r.get("state") == state)

    lines += table(["mechanism", "off means", "img/s on (rounds)", "img/s off (rounds)", "throughput gain %",
                    "lone p50 ms on (rounds)", "lone p50 ms off (rounds)", "lone p50 gain %", "verdict"],
                   [(name, m.get("off_means"), f"{fmt(get(m, 'mean.on.throughput_img_s'))} ({per_round(m, 'on', 'throughput_img_s')})",
                     f"{fmt(get(m, 'mean.off.throughput_img_s'))} ({per_round(m, 'off', 'throughput_img_s')})",
                     get(m, "gain_pct.throughput"),
                     f"{fmt(get(m, 'mean.on.lone_p50_ms'))} ({per_round(m, 'on', 'lone_p50_ms')})",
                     f"{fmt(get(m, 'mean.off.lone_p50_ms'))} ({per_round(m, 'off', 'lone_p50_ms')})",
                     get(m, "gain_pct.lone_p50"), m.get("verdict")) for name, m in mechanisms.items()])  # fmt: skip
    after = f.get("after_verdicts")
    if isinstance(after, Mapping):
        lines += ["", f"Without the mechanisms that did not pay ({fmt(after.get('removed')) or 'none'}): "
                  f"{fmt(get(after, 'run.throughput_img_s'))} img/s, lone p50 {fmt(get(after, 'run.lone_p50_ms'))} ms; "
                  f"in-process {fmt(get(after, 'in_process.throughput_img_s'))} img/s, fastest batch-1 forward "
                  f"{fmt(get(after, 'in_process.forward_ms_batch1'))} ms.", ""]  # fmt: skip
        lines += [f"- {'met' if ok else 'not met'}: {fmt(check)}" for check, ok in (after.get("checks") or {}).items()]
    return lines


def render_gpu_check(f: Figures) -> list[str]:
    lines = [f"{fmt(f.get('epochs'))} epochs per backbone on `{fmt(f.get('data'))}`; AMP "
             f"{fmt(get(f, 'devices.amp_dtype'))}, torch {fmt(get(f, 'devices.torch'))}.", ""]  # fmt: skip
    return lines + table(["backbone", "GPUs", "image px", "batch per GPU", "images/s per GPU", "val acc", "epoch s"],
                         [(r.get("backbone"), r.get("gpus"), r.get("image_size"), r.get("batch_size_per_gpu"),
                           r.get("images_per_s_per_gpu"), r.get("val_accuracy"), r.get("epoch_s"))
                          for r in f.get("results") or []])  # fmt: skip


def render_soak(f: Figures) -> list[str]:
    lines: list[str] = []
    for ingress, run in (f.get("runs") or {}).items():
        lines += [f"**{ingress} ingress**: {fmt(run.get('what'))}; {fmt(run.get('requests'))} requests, "
                  f"{fmt(run.get('failed'))} failed; resident memory drift "
                  f"{fmt(run.get('rss_drift_pct'))} % over whole minutes; p50 {fmt(run.get('p50_ms_range'))} ms and "
                  f"p99 {fmt(run.get('p99_ms_range'))} ms (lowest, highest whole minute); measured "
                  f"{fmt(run.get('date'))}: `{fmt(run.get('command'))}`.", ""]
        lines += table(["minute", "whole", "requests", "failed", "p50 ms", "p99 ms", "RSS MB", "model replicas MB"],
                       [(m.get("minute"), m.get("whole"), m.get("requests"), m.get("failed"), m.get("p50_ms"),
                         m.get("p99_ms"), m.get("rss_mb"), m.get("rss_model_replicas_mb"))
                        for m in run.get("per_minute") or []]) + [""]  # fmt: skip
        lines += table(["kill at s", "requests in flight", "failed: in flight at the kill", "failed: sent after it"],
                       [(k.get("t_s"), k.get("in_flight"), k.get("failed_in_flight"), k.get("failed_sent_after"))
                        for k in run.get("kills") or []]) + [""]  # fmt: skip
    return lines[:-1]


def leaves(figures: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every scalar of a nested mapping as (dotted path, value), lists of scalars kept whole."""
    if isinstance(figures, Mapping):
        return [leaf for key, value in figures.items() for leaf in leaves(value, f"{prefix}{key}.")]
    if isinstance(figures, list) and any(isinstance(v, (Mapping, list)) for v in figures):
        return [leaf for i, value in enumerate(figures) for leaf in leaves(value, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), figures)] if prefix else []


def render_other(f: Figures, skip: Iterable[str] = ("benchmark", "date", "started", "machine")) -> list[str]:
    rows = [(path, value) for key, value in f.items() if key not in skip for path, value in leaves(value, f"{key}.")]
    return table(["figure", "value"], rows)


RENDERERS: dict[str, tuple[str, Callable[[Figures], list[str]]]] = {
    "serve.json": ("Serving: Ray Serve against the same models in-process", render_serve),
    "serve_ab.json": ("Serving mechanisms, each on and off in the same run", render_serve_ab),
    "sweep_accuracy.json": ("Accuracy of a sweep", render_sweep_accuracy),
    "sweep_efficiency.json": ("TPE + ASHA against random search without early stopping", render_sweep_efficiency),
    "sweep_overhead.json": ("Trial overhead", render_sweep_overhead),
    "sweep_train_vs_bare.json": ("Ray Train against a bare torch loop", render_sweep_train_vs_bare),
    "sweep_feature_cache.json": ("Frozen trials on cached features", render_sweep_feature_cache),
    "sweep_pruning.json": ("Backbones ranked before fine-tuning, against not", render_sweep_pruning),
    "preflight.json": ("Pre-flight: refusing an unreachable hub backbone", render_preflight),
    "data.json": ("Data loading and the cache", render_data),
    "gpu_check.json": ("GPU training throughput", render_gpu_check),
    "soak.json": ("Soak: replicas killed under load", render_soak),
}
KNOWN_TOP_LEVEL = {"serve.json": SERVE_KEYS, "serve_ab.json": SERVE_AB_KEYS}


def render_file(name: str, figures: Figures) -> list[str]:
    title, renderer = RENDERERS.get(name, (f"`{name}`", lambda f: render_other(f)))
    lines = [f"## {title}", "", provenance(name, figures), ""] + renderer(figures)
    known = KNOWN_TOP_LEVEL.get(name)
    if known is not None and (extra := {k: v for k, v in figures.items() if k not in known}):
        lines += ["", "Further figures of this run:", ""] + render_other(extra, skip=())
    return lines + [""]


def result_files(results: Path) -> list[Path]:
    """The committed results: every JSON file, smoke-test runs left out; known benchmarks first, in a fixed order."""
    files = [p for p in results.glob("*.json") if not p.name.endswith("_smoke.json")]
    order = list(RENDERERS)
    return sorted(files, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def render(results: Path = RESULTS) -> str:
    lines = [
        "# Benchmark figures",
        "",
        "<!-- Generated by benchmarks/render_readme.py from benchmarks/results/*.json: do not edit by hand. -->",
        "",
        "Each table is rendered from the JSON a benchmark wrote, with the date and machine that file records.",
        "How each benchmark works and how to run it: [docs/benchmarks.md](../docs/benchmarks.md). After a run,",
        "`.venv/bin/python benchmarks/render_readme.py` renders this page again.",
        "",
    ]
    files = result_files(results)
    lines += [f"- [{RENDERERS.get(p.name, (p.name,))[0]}](#{anchor(RENDERERS.get(p.name, (p.name,))[0])})"
              for p in files] + [""]  # fmt: skip
    for path in files:
        lines += render_file(path.name, json.loads(path.read_text(encoding="utf-8")))
    return "\n".join(lines).rstrip("\n") + "\n"


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if benchmarks/README.md is not up to date")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the benchmarks' JSON files")
    parser.add_argument("--out", default=str(README), help="page to write")
    args = parser.parse_args(argv)
    page = render(Path(args.results))
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != page:
            print(f"{out} is stale: run .venv/bin/python benchmarks/render_readme.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
