"""Pre-flight: how long a whole ``automl-tl search`` process takes to refuse a hub backbone it cannot get.

The issue's target: a sweep naming an unreachable hub backbone exits 2 within 5 s, the whole process counted
(interpreter start, imports, the check, exit), with ``HF_HUB_OFFLINE`` unset. Two offline machines: one whose
name resolution fails at once (this sandbox), and one whose firewall swallows requests (a local socket that
accepts connections and never answers, as ``HF_ENDPOINT``), where the check waits out its deadline. Each case
runs ``--repeats`` times; the median and the load average go to ``benchmarks/results/preflight.json``::

    .venv/bin/python benchmarks/bench_preflight.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BACKBONE = "timm:resnet18.a1_in1k"  # not registered, not in any cache: its weights live on the hub alone


def _env(tmp: Path, endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update({"HF_HOME": str(tmp / "hf"), "AUTOML_TL_WEIGHTS_DIR": str(tmp / "weights"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})  # fmt: skip
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def _time_search(tmp: Path, endpoint: str | None) -> tuple[float, int, str]:
    """Wall seconds of one whole ``automl-tl search`` process, its exit code and its last stderr line."""
    config = tmp / "config.yaml"
    config.write_text(f'data: {{source: {tmp / "images"}}}\nspace: {{backbones: ["{BACKBONE}"]}}\n', encoding="utf-8")
    command = [sys.executable, "-m", "automl_tl.cli", "search", "--config", str(config), "--out", str(tmp / "run")]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(tmp, endpoint), timeout=300, check=False)
    wall_s = time.perf_counter() - started
    if (tmp / "run").exists():
        raise SystemExit(f"the refused sweep left a run directory {tmp / 'run'}")
    return wall_s, proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    cases = {"name_resolution_fails": None, "hub_never_answers": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    figures: dict[str, Any] = {
        "benchmark": "preflight", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPUs",
        "command": f"automl-tl search --config C (space.backbones: [{BACKBONE}]), HF_HUB_OFFLINE unset",
        "target": "exit code 2 within 5 s, the whole process", "repeats": args.repeats,
    }  # fmt: skip
    for case, endpoint in cases.items():
        walls, codes = [], set()
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                wall_s, code, message = _time_search(Path(tmp), endpoint)
            walls.append(wall_s)
            codes.add(code)
        figures[case] = {
            "endpoint": endpoint or "the default (https://huggingface.co)",
            "median_wall_s": round(statistics.median(walls), 2), "max_wall_s": round(max(walls), 2),
            "wall_s": [round(w, 2) for w in walls], "exit_codes": sorted(codes),
            "load_average_1_5_15min_at_end": [round(v, 1) for v in os.getloadavg()], "message": message[:400],
        }  # fmt: skip
        print(f"[bench] {case}: median {figures[case]['median_wall_s']} s, exit codes {sorted(codes)}")
    silent.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "preflight.json"
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
