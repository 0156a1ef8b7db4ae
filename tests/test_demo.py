"""`automl-tl demo` end to end, as the README's first command runs it, on a small real folder and budget.

The built-in data and the full 6-minute budget are the README's own run (its excerpt); here the same code path
runs on hymenoptera's train folder with a budget of under a minute, and must still serve and answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from automl_tl.data._cache import CACHE_ENV
from tests.scenarios._common import free_port as _free_port

pytestmark = pytest.mark.slow
EXE = str(Path(sys.executable).parent / "automl-tl")


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", CACHE_ENV: str(cache)}


def test_demo_sweeps_reports_serves_and_compares_with_random_init(
    hymenoptera_dir: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [EXE, "demo", "--data", str(hymenoptera_dir / "train"), "--out", str(out), "--budget-s", "20",
         "--port", str(_free_port())],
        env=_env(data_cache_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "[demo] leaderboard:" in text and ("tf_efficientnet_lite0" in text or "mobilenetv2_100" in text)
    assert "same backbone from random init" in text
    answers = [line for line in text.splitlines() if "POST /v1/predict ->" in line]
    assert len(answers) == 2  # one held-out image per class
    assert {line.rsplit("true label: ", 1)[1] for line in answers} == {"ants", "bees"}
    assert (out / "report.html").is_file() and (out / "artifact" / "manifest.json").is_file()
    assert "[demo] done in" in text


def test_demo_refuses_a_busy_port_before_the_sweep(data_cache_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [EXE, "demo", "--out", str(tmp_path / "run"), "--port", str(port)],
            env=_env(data_cache_dir), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing ran
