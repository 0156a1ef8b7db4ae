"""Config: frozen pydantic models from YAML, validated at the edge with messages that name the field."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from pydantic import ValidationError

from automl_tl.cli import main
from automl_tl.config import ExperimentConfig, FloatRange, config_error, config_to_dict, load_config
from automl_tl.errors import AutoMLError, ConfigError
from automl_tl.serve._args import AppArgs, read_token


def test_defaults_load_and_round_trip() -> None:
    config = load_config(None)
    assert config == ExperimentConfig()
    assert load_config(config_to_dict(config)) == config


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(ValidationError, match="frozen"):
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
    assert config.space.learning_rate == FloatRange(low=1e-4, high=1e-2, log=True)
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


def test_several_mistakes_are_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(
        "search:\n  num_samples: 0\n  scheduler: median\n"
        "space:\n  learnin_rate: [1.0e-4, 1.0e-2]\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 3 problems:"
    assert sorted(line.strip() for line in lines[1:]) == sorted(
        [
            "search.num_samples: must be >= 1, got 0",
            "search.scheduler: must be one of 'asha', 'hyperband', 'pbt', 'none', got 'median'",
            "space: unknown key 'learnin_rate'; allowed: augmentations, backbone_lr_ratio, backbones, batch_sizes, "
            "feature_scales, freeze_depths, heads, image_sizes, label_smoothing, layer_decay, learning_rate, max_epochs, mlp_dropout, "
            "optimizers, "
            "weight_decay (did you mean 'learning_rate'?)",
        ]
    )
    assert main(["config", str(path)]) == 2
    assert capsys.readouterr().err == f"automl-tl: error: {info.value}\n"


def test_cross_field_rules_report_alongside_other_sections() -> None:
    raw = {
        "data": {"val_fraction": 0.5, "test_fraction": 0.45},
        "space": {"backbone_lr_ratio": [0.1, 2.0], "label_smoothing": [0.0, 1.0]},
        "resources": {"gpus_per_trial": "two"},
    }
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    message = str(info.value)
    assert message.startswith("4 problems:")
    assert "data: val_fraction + test_fraction must be < 0.9" in message
    assert "space.backbone_lr_ratio: must be <= 1" in message
    assert "space.label_smoothing: must lie in [0, 1), got [0.0, 1.0]" in message
    assert "resources.gpus_per_trial: expected a number, got 'two'" in message


def test_empty_sections_take_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("search:\nspace:\n", encoding="utf-8")
    assert load_config(path) == ExperimentConfig()


def test_config_refuses_an_unknown_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`automl-tl config` runs search's own pre-flight check: a backbone search refuses is refused here too."""
    path = tmp_path / "backbone.yaml"
    path.write_text("space:\n  backbones: [resnet9000]\n", encoding="utf-8")
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"automl-tl: error: {path}: unknown backbone 'resnet9000'; registered: ")
    deep = tmp_path / "deep.yaml"
    deep.write_text("space:\n  backbones: [mobilenetv2_100]\n  freeze_depths: [20]\n", encoding="utf-8")
    assert main(["config", str(deep)]) == 2
    assert "space.freeze_depths: 20 is deeper than any chosen backbone allows (max 8" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("space:\n  backbones: [mobilenetv2_100]\n", encoding="utf-8")
    assert main(["config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"


def test_serving_arguments_read_like_the_config() -> None:
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate({"artifact": "x", "replicas": 0, "max_batchsize": 4})
    message = str(config_error(info.value, "serve", AppArgs))
    assert message.splitlines()[0] == "serve: 2 problems:"
    assert "  replicas: must be >= 1, got 0" in message.splitlines()
    assert "unknown key 'max_batchsize'" in message and "(did you mean 'max_batch_size'?)" in message


def test_trial_config_is_validated_like_the_config() -> None:
    from automl_tl.train.loop import TrialConfig

    params = {"backbone": "mobilenetv2_100", "freeze_depth": 8, "learning_rate": "1e-3", "backbone_lr_ratio": 0.1,
              "augmentation": "none", "optimizer": "adamw", "weight_decay": 1e-4, "label_smoothing": 0.0,
              "batch_size": 16, "max_epochs": 1, "head": "linear", "head_dropout": 0.0, "not_a_field": 1}  # fmt: skip
    assert TrialConfig.from_params(params).learning_rate == 1e-3
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_params({**params, "batch_size": True, "head": "deep"})
    assert str(info.value).splitlines()[1:] == [
        "  batch_size: expected an integer, got True",
        "  head: must be one of 'linear', 'mlp', got 'deep'",
    ]


def test_bearer_token_never_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = "s3cr3t-token-value"
    monkeypatch.setenv("AUTOML_TL_TEST_TOKEN", f"  {token}\n")
    secret = read_token(AppArgs(artifact="x", token_env="AUTOML_TL_TEST_TOKEN"))
    assert secret is not None and secret.get_secret_value() == token
    try:
        raise RuntimeError("failed while holding", secret)
    except RuntimeError:
        shown = traceback.format_exc()
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret]), shown):
        assert token not in text
    assert pickle.loads(pickle.dumps(secret)).get_secret_value() == token  # it still reaches the replicas
    (tmp_path / "token").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="the bearer token cannot be empty"):
        read_token(AppArgs(artifact="x", token_file=str(tmp_path / "token")))
    assert read_token(AppArgs(artifact="x")) is None and "AUTOML_TL_TEST_TOKEN" in os.environ
