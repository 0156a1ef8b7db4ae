"""The numbered examples stay runnable: each one's --smoke-test mode runs here as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow
EXAMPLES = REPO_ROOT / "examples"


def run_example(args: list[str], cwd: Path, timeout: int = 420) -> str:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def quickstart_run(hymenoptera_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("quickstart")
    out = run_example([str(EXAMPLES / "01_quickstart.py"), "--smoke-test", "--out", str(work / "run")], cwd=work)
    return work / "run", out


def test_01_quickstart(quickstart_run: tuple[Path, str]) -> None:
    run_dir, out = quickstart_run
    assert "best trial" in out and "test accuracy" in out and "artifact:" in out
    assert (run_dir / "artifact" / "manifest.json").is_file() and (run_dir / "report.html").is_file()
    last = out.strip().splitlines()[-1]
    assert last.split(": ")[1].split(" (")[0] in {"ants", "bees"}  # the predicted class of one image


def test_02_custom_search_space(hymenoptera_dir: Path, tmp_path: Path) -> None:
    out = run_example([str(EXAMPLES / "02_custom_search_space.py"), "--smoke-test", "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert "2 backbones, freeze depths [4, 6, 8]" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s*\d+ \w+ \S+\s+freeze \d+ .* val_acc [0-9.]+$", line)]
    assert len(rows) == 2, out[-3000:]  # the leaderboard the script prints: one row per trial


def test_05_export_onnx(quickstart_run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = quickstart_run
    out = run_example([str(EXAMPLES / "05_export_onnx.py"), str(run_dir / "artifact"), "--smoke-test",
                       "--out", str(tmp_path / "model.onnx")], cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "model.onnx").is_file()
    assert "onnxruntime vs Predictor" in out or "resizes inside" in out


def test_03_serve_and_query(quickstart_run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = quickstart_run
    out = run_example([str(EXAMPLES / "03_serve_and_query.py"), str(run_dir), "--smoke-test"], cwd=tmp_path)
    forms = {line.split("|")[0].strip() for line in out.splitlines() if "|" in line}
    assert forms == {"raw", "multipart", "base64"}
    assert "healthz -> HTTP 200" in out and "corrupt bytes -> HTTP 4" in out
    assert out.rstrip().endswith("server stopped")
