"""Each effective configuration runs once: the trial identity, the searcher that skips repeats, and the end of
a space whose distinct points have all run. The searcher is driven by hand (no Ray cluster).

    .venv/bin/python -m pytest -q tests/test_searcher.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from automl_tl.backbones import list_backbones
from automl_tl.config import ExperimentConfig, load_config
from automl_tl.train.trial_config import PROBE_IGNORES, TrialConfig

_BASE: dict[str, Any] = {
    "backbone": "mobilenetv2_100", "freeze_depth": 8, "learning_rate": 1e-3, "backbone_lr_ratio": 0.1,
    "augmentation": "none", "optimizer": "lbfgs", "weight_decay": 1e-4, "label_smoothing": 0.1, "batch_size": 32,
    "max_epochs": 3, "head": "linear", "head_dropout": 0.0, "image_size": 64,
}  # fmt: skip


def _identity(**changes: Any) -> tuple[tuple[str, Any], ...]:
    return TrialConfig.from_params({**_BASE, **changes}).identity()


def test_probes_that_differ_only_in_what_the_probe_ignores_are_one_point() -> None:
    probe = _identity()
    ignored = {"learning_rate": 3e-2, "backbone_lr_ratio": 0.5, "layer_decay": 0.7, "weight_decay": 1e-2,
               "label_smoothing": 0.0, "batch_size": 64, "head_dropout": 0.4, "max_epochs": 8,
               "plateau_patience": 1}  # fmt: skip
    assert set(ignored) == PROBE_IGNORES
    assert _identity(**ignored) == probe
    assert _identity(freeze_depth=9) == probe  # past the whole extractor freezes the same
    # What the probe reads still tells points apart.
    for changed in ({"backbone": "tf_efficientnet_lite0"}, {"feature_scale": 1.25}, {"freeze_depth": 7},
                    {"head": "mlp"}, {"image_size": 96}, {"optimizer": "adamw"}, {"augmentation": "light"}):  # fmt: skip
        assert _identity(**changed) != probe, changed


def test_a_head_trained_by_steps_reads_its_optimizer_settings_but_not_the_backbone_rates() -> None:
    head = _identity(optimizer="adamw")
    assert _identity(optimizer="adamw", backbone_lr_ratio=0.5, layer_decay=0.7) == head  # no backbone layer trains
    for changed in ({"learning_rate": 3e-2}, {"batch_size": 64}, {"label_smoothing": 0.0}, {"head_dropout": 0.3},
                    {"weight_decay": 1e-2}, {"optimizer": "sgd"}, {"max_epochs": 8}):  # fmt: skip
        assert _identity(**{"optimizer": "adamw", **changed}) != head, changed


def test_image_trials_ignore_the_feature_scale_and_a_decay_that_has_one_layer_to_act_on() -> None:
    one_stage = dict(optimizer="adamw", freeze_depth=7)  # only the deepest stage trains: it learns at the ratio's rate
    assert _identity(**one_stage, layer_decay=0.5) == _identity(**one_stage)
    assert _identity(**one_stage, backbone_lr_ratio=0.5) != _identity(**one_stage)
    everything = dict(optimizer="adamw", freeze_depth=0)
    assert _identity(**everything, layer_decay=0.5) != _identity(**everything)
    assert _identity(**everything, feature_scale=1.25) == _identity(**everything)  # only a frozen extractor reads it
    augmented = dict(optimizer="lbfgs", augmentation="light")  # LP-FT on images: every step setting counts
    assert _identity(**augmented, learning_rate=3e-2) != _identity(**augmented)


@pytest.mark.parametrize("name", list_backbones())
def test_the_backbone_rates_count_exactly_where_backbone_layers_train(name: str) -> None:
    """The identity's count of trained layers against the network itself, over the registry."""
    from automl_tl.backbones import create_backbone, resolve_spec

    deepest = resolve_spec(name).max_freeze_depth
    for depth in sorted({0, 1, deepest - 1, deepest}):
        layers = sum(1 for layer in create_backbone(name, 3, pretrained=False, freeze_depth=depth).trainable_layers() if layer)
        fields = dict(_identity(backbone=name, freeze_depth=depth, optimizer="adamw", augmentation="light"))
        assert ("layer_decay" in fields, "backbone_lr_ratio" in fields) == (layers >= 2, layers >= 1), depth


# --- the searcher -------------------------------------------------------------------------------------------


def _searcher(tmp_path: Path, config: ExperimentConfig, sampler: Any = None) -> Any:
    import optuna

    from automl_tl.evaluate.ranking import metric_mode
    from automl_tl.sweep.searcher import ranked_search
    from automl_tl.sweep.space import build_param_space, frozen_start_points

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = build_param_space(config)
    search = ranked_search(config, space, tmp_path / "ranking.json", sampler=sampler or optuna.samplers.RandomSampler(seed=0),
                           points_to_evaluate=frozen_start_points(config, space))  # fmt: skip
    search.set_search_properties("val_accuracy", metric_mode("val_accuracy"), space)
    return search


def _config(search: Any, params: dict[str, Any]) -> TrialConfig:
    return TrialConfig.from_params({**search._constants, **params})


def test_the_searcher_runs_each_effective_configuration_once(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    space = {"backbones": ["mobilenetv2_100", "tf_efficientnet_lite0"], "freeze_depths": [7, 8],
             "augmentations": ["none"], "optimizers": ["lbfgs", "adamw"], "heads": ["linear"], "image_sizes": [64],
             "feature_scales": [1.0, 1.25]}  # fmt: skip
    search = _searcher(tmp_path, load_config({"space": space}))
    ran: dict[tuple[tuple[str, Any], ...], str] = {}
    configs = []
    for i in range(24):  # running side by side: half of them finish before the next proposals
        params = search.suggest(f"t{i}")
        assert isinstance(params, dict)
        configs.append(_config(search, params))
        identity = configs[-1].identity()
        assert identity not in ran, f"t{i} repeats {ran.get(identity)}"
        ran[identity] = f"t{i}"
        if i % 2:
            search.on_trial_complete(f"t{i}", {"val_accuracy": 0.9, "training_iteration": 1})
    kinds = {(c.backbone, c.freeze_depth, c.feature_scale if c.frozen_features else 1.0, c.optimizer)
             for c in configs}  # fmt: skip
    # Probes (lbfgs at depth 8) of both backbones at both feature scales ran once each; other points still ran.
    probes = {k for k in kinds if k[1] == 8 and k[3] == "lbfgs"}
    assert probes == {(b, 8, s, "lbfgs") for b in space["backbones"] for s in (1.0, 1.25)}
    assert {k[1] for k in kinds} == {7, 8} and len(kinds) > len(probes)
    # Every skipped proposal is a failed Optuna trial (out of TPE's model) that repeats a trial that ran.
    record = json.loads((tmp_path / "ranking.json").read_text(encoding="utf-8"))
    trials = search._ot_study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert record["duplicates_skipped"] == len(failed) == sum(record["duplicates_of"].values()) > 0
    assert all(_config(search, t.params).identity() in ran for t in failed)
    assert set(record["duplicates_of"]) <= set(ran.values())
    assert len(trials) - len(failed) == len(ran)  # no Optuna trial left behind besides the ones that run


def test_after_the_probe_is_best_the_next_proposal_leaves_it_at_once(tmp_path: Path) -> None:
    """TPE, having seen only the probe and that it was good, proposes it again and again: the searcher must
    not spend thousands of asks (minutes) waiting for TPE to leave it."""
    import optuna

    space = {"backbones": ["mobilenetv2_100"], "freeze_depths": [8], "augmentations": ["none"],
             "image_sizes": [64], "batch_sizes": [32]}  # fmt: skip
    search = _searcher(tmp_path, load_config({"space": space}), optuna.samplers.TPESampler(seed=0, n_startup_trials=1))
    first = search.suggest("t0")
    assert isinstance(first, dict) and _config(search, first).is_probe
    search.on_trial_complete("t0", {"val_accuracy": 0.9, "training_iteration": 1})
    for i in range(1, 4):
        params = search.suggest(f"t{i}")
        assert isinstance(params, dict) and not _config(search, params).is_probe
        search.on_trial_complete(f"t{i}", {"val_accuracy": 0.5, "training_iteration": 1})
    record = json.loads((tmp_path / "ranking.json").read_text(encoding="utf-8")) if (tmp_path / "ranking.json").exists() else {}
    assert record.get("duplicates_skipped", 0) <= 10, record


def test_a_space_whose_distinct_points_have_all_run_ends_the_search(tmp_path: Path) -> None:
    from ray.tune.search import Searcher

    from automl_tl.sweep.space import build_param_space, count_points
    from automl_tl.sweep.tuner import _trial_cap, sweep_end

    # Probes only: the learning rate and the other step settings are searched, but no trial reads them.
    space = {"backbones": ["mobilenetv2_100"], "freeze_depths": [8], "augmentations": ["none"],
             "optimizers": ["lbfgs"], "heads": ["linear", "mlp"], "image_sizes": [64]}  # fmt: skip
    config = load_config({"space": space})
    assert count_points(build_param_space(config)) == 2
    assert _trial_cap(config, build_param_space(config)) == 2  # Tune's num_samples
    search = _searcher(tmp_path, config)
    first, second = (search.suggest(f"t{i}") for i in range(2))
    assert {first["head"], second["head"]} == {"linear", "mlp"}
    search.on_trial_complete("t0", {"val_accuracy": 0.9, "training_iteration": 1})
    assert search.suggest("t2") == Searcher.FINISHED  # at once: no proposal asked of Optuna, none run
    assert len(search._ot_study.get_trials(deepcopy=False)) == 2
    end = sweep_end(config, build_param_space(config), 2, 12.0)
    assert end["stop_reason"].startswith("space_exhausted") and "2 distinct point(s)" in end["stop_reason"]


def test_tpe_moves_on_from_a_best_point_that_its_proposals_keep_repeating(tmp_path: Path) -> None:
    """The demo's space, where the probe scores best and TPE keeps proposing it at other learning rates: every
    request still gets a new configuration."""
    import optuna

    from automl_tl.demo import demo_config

    search = _searcher(tmp_path, demo_config(), optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    seen = set()
    for i in range(30):
        params = search.suggest(f"t{i}")
        assert isinstance(params, dict), f"request {i} got {params!r}"
        cfg = _config(search, params)
        seen.add(cfg.identity())
        score = 0.95 if cfg.is_probe else 0.9 - 0.02 * abs(math.log10(cfg.learning_rate) + 2.5)
        search.on_trial_complete(f"t{i}", {"val_accuracy": score, "training_iteration": 1})
    assert len(seen) == 30
    assert json.loads((tmp_path / "ranking.json").read_text(encoding="utf-8"))["duplicates_skipped"] > 0


def test_the_summary_counts_skipped_duplicates(tmp_path: Path) -> None:
    from automl_tl.sweep.searcher import ranking_summary

    config = load_config(None)
    (tmp_path / "ranking.json").write_text(json.dumps({"duplicates_skipped": 7}), encoding="utf-8")
    assert ranking_summary(config, [], tmp_path / "ranking.json")["duplicates_skipped"] == 7
    assert ranking_summary(config, [], tmp_path / "missing.json")["duplicates_skipped"] == 0  # an older run
