"""Presets: what fast, balanced and best pick from the hardware and the weights a machine reaches, that the
user's own settings win, and that the CLI says what it picked and why. Hardware is a value: a test asks what
``best`` picks on eight large GPUs with the hub, on a machine with neither.

    .venv/bin/python -m pytest -q tests/test_presets.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml

from automl_tl.backbones import license_terms, list_backbones, timm_weights_source
from automl_tl.cli import _load_search_config, build_parser, main
from automl_tl.config import PRESETS, config_to_dict, load_config
from automl_tl.errors import ConfigError
from automl_tl.sweep.presets import CURATED, Choice, Hardware, apply_preset, choose, detect_hardware, explain

from .test_backbone_families import FAMILIES

CPU_OFFLINE = Hardware(cpus=2, hub_note="HF_HUB_OFFLINE is set")
CPU_HUB = Hardware(cpus=16, hub=True)
SMALL_GPU = Hardware(cpus=8, gpu_memory_gib=(12.0,), hub=True)
EIGHT_LARGE_GPUS = Hardware(cpus=96, gpu_memory_gib=(80.0,) * 8, hub=True)


def picked(preset: str, hardware: Hardware) -> dict[str, Any]:
    return {c.field: c.value for c in choose(preset, hardware)}


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_cpu_offline_searches_the_registered_backbones() -> None:
    counts = []
    for preset in PRESETS:
        choice = picked(preset, CPU_OFFLINE)
        backbones = choice["space.backbones"]
        assert isinstance(backbones, tuple) and set(backbones) <= set(list_backbones())
        assert choice["resources.gpus_per_trial"] == 0.0 and choice["search.max_concurrent_trials"] == 1
        assert choice["resources.cpus_per_worker"] == 2.0  # both cores for the one trial
        assert len(choice["space.image_sizes"]) == 1  # a CPU never trains at native 518 px
        counts.append((len(backbones), choice["space.max_epochs"], choice["search.time_budget_s"]))
    assert counts == sorted(counts) and len(set(counts)) == 3  # fast < balanced < best in every respect
    assert picked("best", CPU_OFFLINE)["space.backbones"] == tuple(list_backbones())
    why = next(c for c in choose("fast", CPU_OFFLINE) if c.field == "space.backbones").why
    assert "registered" in why and "HF_HUB_OFFLINE is set" in why


def test_cpu_with_the_hub_searches_compact_current_backbones_side_by_side() -> None:
    choice = picked("best", CPU_HUB)
    compact = {r.name for r in CURATED if r.tier == "compact"}
    assert set(choice["space.backbones"]) == compact  # siglip has no compact variant
    assert choice["search.max_concurrent_trials"] == 8 and choice["resources.cpus_per_worker"] == 2.0
    assert choice["search.num_samples"] == 16 * 8
    assert picked("fast", CPU_HUB)["space.backbones"] == (
        "timm:convnext_nano.in12k_ft_in1k", "timm:tf_efficientnetv2_b3.in21k_ft_in1k")


def test_one_small_gpu_runs_one_trial_on_it() -> None:
    for preset in PRESETS:
        choice = picked(preset, SMALL_GPU)
        assert choice["resources.gpus_per_trial"] == 1.0 and choice["search.max_concurrent_trials"] == 1
        assert choice["resources.cpus_per_worker"] == 8.0 and choice["space.image_sizes"] != ()  # native 518 would not fit
    tiers = {r.name: r.tier for r in CURATED}
    assert {tiers[b] for b in picked("fast", SMALL_GPU)["space.backbones"]} == {"compact"}
    assert {tiers[b] for b in picked("best", SMALL_GPU)["space.backbones"]} == {"base"}


def test_eight_large_gpus_search_the_large_tier_at_native_size() -> None:
    choice = picked("best", EIGHT_LARGE_GPUS)
    backbones = choice["space.backbones"]
    assert backbones == tuple(r.name for r in CURATED if r.tier == "large")  # one per family, siglip included
    assert {r.family for r in CURATED if r.name in backbones} == {"convnext", "eva02", "dinov2_registers",
                                                                  "efficientnetv2", "siglip"}  # fmt: skip
    assert choice["space.image_sizes"] == () and choice["search.max_concurrent_trials"] == 8
    assert choice["resources.gpus_per_trial"] == 1.0 and choice["resources.cpus_per_worker"] == 12.0
    assert choice["search.num_samples"] == 16 * 8
    # fast shares each roomy GPU between two compact-tier trials; on four of them, best runs four at once
    assert picked("fast", Hardware(96, (24.0,) * 8, hub=True))["search.max_concurrent_trials"] == 16
    assert picked("best", Hardware(64, (80.0,) * 4, hub=True))["search.max_concurrent_trials"] == 4
    # the smallest GPU decides: one small card among large ones sizes the whole sweep for small cards
    assert picked("best", Hardware(64, (80.0, 80.0, 12.0), hub=True))["space.image_sizes"] == (224,)


def test_offline_curated_weights_on_disk_come_first() -> None:
    on_disk = "timm:convnext_base.fb_in22k_ft_in1k"
    hardware = Hardware(64, (80.0,) * 4, local_weights=frozenset({on_disk}), hub_note="HF_HUB_OFFLINE is set")
    backbones = picked("best", hardware)["space.backbones"]
    assert backbones[0] == on_disk and set(backbones[1:]) <= set(list_backbones())


def test_the_users_settings_win() -> None:
    config = load_config({"preset": "best", "space": {"backbones": ["mobilenetv2_100"], "max_epochs": 2},
                          "resources": {"cpus_per_worker": 3.0}})  # fmt: skip
    config = config.replace("search", num_samples=5)  # as `--trials 5` does
    resolved, choices = apply_preset(config, EIGHT_LARGE_GPUS)
    assert resolved.space.backbones == ("mobilenetv2_100",) and resolved.space.max_epochs == 2
    assert resolved.search.num_samples == 5 and resolved.resources.cpus_per_worker == 3.0
    assert resolved.space.image_sizes == () and resolved.search.time_budget_s == 7200.0  # the preset's
    assert resolved.resources.gpus_per_trial == 1.0 and resolved.search.max_concurrent_trials == 8
    yours = {c.field for c in choices if c.yours}
    assert yours == {"space.backbones", "space.max_epochs", "search.num_samples", "resources.cpus_per_worker"}
    assert "yours kept" in next(c for c in choices if c.field == "space.backbones").line()
    # what the run directory keeps loads back to itself, and the preset then changes nothing
    again, _ = apply_preset(load_config(config_to_dict(resolved)), SMALL_GPU)
    assert again == resolved


def test_keeping_gpus_out_sizes_the_sweep_for_the_cpus() -> None:
    resolved, _ = apply_preset(load_config({"preset": "fast", "resources": {"gpus_per_trial": 0}}), EIGHT_LARGE_GPUS)
    assert resolved.resources.gpus_per_trial == 0.0 and resolved.space.image_sizes == (160,)
    assert all(b.startswith("timm:") for b in resolved.space.backbones)  # the hub still answers


def test_no_preset_changes_nothing_and_a_bad_one_names_the_choices() -> None:
    config = load_config({"space": {"max_epochs": 3}})
    assert apply_preset(config, CPU_OFFLINE) == (config, [])
    with pytest.raises(ConfigError) as info:
        load_config({"preset": "fastest"})
    assert "preset" in str(info.value) and "'fastest'" in str(info.value) and "balanced" in str(info.value)


def test_curated_backbones_are_tested_families_under_permissive_licenses() -> None:
    """Each curated backbone is a family the family test runs end to end: the same timm class as that
    family's smallest variant; its weights' license allows commercial use."""
    for row in CURATED:
        arch = row.name.removeprefix("timm:")
        assert row.family in FAMILIES and timm.is_model(arch), row
        with torch.device("meta"):
            built = timm.create_model(arch, pretrained=False)
            tested = timm.create_model(FAMILIES[row.family], pretrained=False)
        assert type(built) is type(tested), (row, type(built), type(tested))
        source = timm_weights_source(row.name)
        assert license_terms(source.license) == "permissive", (row, source.license)
    names = [r.name for r in CURATED]
    assert len(names) == len(set(names))


def test_this_machine_is_detected(hub_offline: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOML_TL_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "convnext_nano.in12k_ft_in1k.safetensors").write_bytes(b"")  # as a user puts downloaded weights
    hardware = detect_hardware()
    assert hardware.cpus == os.cpu_count() and hardware.gpus == torch.cuda.device_count()
    assert not hardware.hub and hardware.hub_note == "HF_HUB_OFFLINE is set"
    assert hardware.local_weights == {"timm:convnext_nano.in12k_ft_in1k"}
    assert hardware.reachable("timm:convnext_nano.in12k_ft_in1k")


def test_the_cli_says_what_a_preset_picks_and_why(hub_offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones", "--preset", "best"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"preset best on {os.cpu_count()} CPUs") and "HF_HUB_OFFLINE is set" in lines[0]
    fields = [line.split(":")[0] for line in lines[1:]]
    assert fields == [c.field for c in choose("best", CPU_OFFLINE)]  # one line per choice
    assert all(": " in line.split(":", 1)[1] for line in lines[1:])  # each with its reason
    assert main(["backbones", "--preset", "fast", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["preset"] == "fast" and shown["hardware"]["hub"] is False
    assert {c["field"] for c in shown["choices"]} >= {"space.backbones", "search.max_concurrent_trials"}


def test_search_with_a_preset_validates(hub_offline: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from automl_tl.sweep.driver import check_search

    args = build_parser().parse_args(["search", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                      "--preset", "fast", "--trials", "3"])  # fmt: skip
    config = _load_search_config(args)
    assert config.preset == "fast" and config.search.num_samples == 3
    resolved, _ = apply_preset(config, CPU_OFFLINE)
    assert resolved.search.num_samples == 3 and resolved.space.image_sizes == (160,)
    assert check_search(resolved)  # the registered backbones' weights are here: what `search` would start with
    file = tmp_path / "fast.yaml"
    file.write_text("preset: fast\nsearch: {num_samples: 2}\n")
    assert main(["config", str(file), "--show"]) == 0
    out, err = capsys.readouterr()
    assert load_config(yaml.safe_load(out)).search.num_samples == 2  # the resolved config, yours kept
    assert "preset fast on" in err and "search.num_samples: yours kept" in err


def test_explain_has_a_headline_then_one_line_per_choice() -> None:
    choices = [Choice("space.max_epochs", 4, "preset fast: epochs per trial")]
    assert explain("fast", CPU_OFFLINE, choices) == [
        "preset fast on 2 CPUs, no GPU; the hub is unreachable (HF_HUB_OFFLINE is set)",
        "space.max_epochs: 4: preset fast: epochs per trial",
    ]
