"""Config: frozen dataclasses from YAML, validated at the edge with messages that name the field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from automl_tl.config import ExperimentConfig, FloatRange, config_to_dict, load_config
from automl_tl.errors import AutoMLError, ConfigError


def test_defaults_load_and_round_trip() -> None:
    config = load_config(None)
    assert config == ExperimentConfig()
    assert load_config(config_to_dict(config)) == config


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.search.num_samples = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"serch": {}}, "unknown key 'serch'"),
        ({"search": {"num_sampels": 3}}, "search: unknown key 'num_sampels'"),
        ({"search": {"num_sampels": 3}}, "did you mean 'num_samples'"),
        ({"search": {"num_samples": 0}}, "search.num_samples: must be >= 1, got 0"),
        ({"search": {"num_samples": "ten"}}, "search.num_samples: expected an integer, got 'ten'"),
        ({"search": {"num_samples": True}}, "search.num_samples: expected an integer, got True"),
        ({"search": {"scheduler": "median"}}, "search.scheduler: must be one of 'asha', 'hyperband', 'pbt', 'none'"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction: must be < 1.0, got 1.5"),
        ({"data": {"val_fraction": 0.5, "test_fraction": 0.45}}, "val_fraction + test_fraction must be < 0.9"),
        ({"space": {"learning_rate": {"low": 0.1, "high": 0.01}}}, "low <= high must hold"),
        ({"space": {"learning_rate": {"low": 0.0, "high": 0.01, "log": True}}}, "a log range needs low > 0"),
        ({"space": {"augmentations": ["light", "extreme"]}}, "space.augmentations[1]: must be one of"),
        ({"space": {"batch_sizes": []}}, "space.batch_sizes: needs at least 1 value(s)"),
        ({"space": {"backbone_lr_ratio": [0.1, 2.0]}}, "space.backbone_lr_ratio: must be <= 1"),
        ({"resources": {"gpus_per_trial": -1}}, "resources.gpus_per_trial: must be >= 0.0, got -1"),
        ({"search": []}, "search: expected a mapping of fields, got []"),
    ],
)
def test_bad_values_name_field_value_and_allowed(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert expected in str(info.value)


def test_yaml_file_with_scientific_notation_and_scalars(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        "space:\n"
        "  backbones: tf_efficientnet_lite0\n"  # a scalar fixes a list dimension
        "  learning_rate: {low: 1e-4, high: 1e-2, log: true}\n"  # YAML 1.1 reads 1e-4 as a string
        "  label_smoothing: 0.1\n"
        "search:\n  num_samples: 4\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.space.backbones == ("tf_efficientnet_lite0",)
    assert config.space.learning_rate == FloatRange(1e-4, 1e-2, log=True)
    assert config.space.label_smoothing.fixed
    assert config.search.num_samples == 4


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("search:\n  time_budget_s: -5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: search.time_budget_s: must be > 0, got -5"):
        load_config(path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("search: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_replace_validates_like_a_file() -> None:
    config = load_config(None).replace("search", num_samples=3)
    assert config.search.num_samples == 3
    with pytest.raises(ConfigError, match="search.num_samples"):
        config.replace("search", num_samples=-1)


def test_error_tree() -> None:
    assert issubclass(ConfigError, AutoMLError)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("search:\n  num_samples: 0\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "automl_tl.cli", "config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"automl-tl: error: {path}: search.num_samples: must be >= 1, got 0"]
    assert "Traceback" not in proc.stderr


def test_cli_shows_default_config() -> None:
    proc = subprocess.run([sys.executable, "-m", "automl_tl.cli", "config", "--show"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "num_samples: null" in proc.stdout  # no cap: the time budget bounds the trials
    assert "time_budget_s: 600.0" in proc.stdout
