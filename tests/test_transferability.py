"""Backbones ranked before fine-tuning: LogME, the pruning rule, the searcher that declines, a real sweep.

    .venv/bin/python -m pytest -q tests/test_transferability.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from automl_tl.config import load_config
from automl_tl.errors import ConfigError
from automl_tl.train.transferability import backbone_scores, logme, prune_decisions, ranking_enabled


def _classes(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n)


def _features(labels: np.ndarray, width: int, noise: float, seed: int) -> np.ndarray:
    """Class centres in ``width`` dimensions plus Gaussian noise of scale ``noise``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(labels.max()) + 1, width))
    return centres[labels] + noise * rng.normal(size=(labels.size, width))


@pytest.mark.parametrize("width", [32, 600])  # more images than features, and fewer
def test_logme_ranks_separable_features_above_weaker_and_random_ones(width: int) -> None:
    y = _classes(300, 4, seed=1)
    scores = [logme(_features(y, width, noise, seed=2), y) for noise in (0.3, 1.0, 3.0)]
    random = logme(np.random.default_rng(3).normal(size=(300, width)), y)
    assert scores[0] > scores[1] > scores[2] > random
    assert all(np.isfinite(scores)) and np.isfinite(random)


def test_logme_does_not_depend_on_the_order_of_images_or_the_scale_of_features() -> None:
    y = _classes(200, 3, seed=4)
    x = _features(y, 48, 1.0, seed=5)
    order = np.random.default_rng(6).permutation(y.size)
    assert logme(x[order], y[order]) == pytest.approx(logme(x, y), abs=1e-6)
    assert logme(10.0 * x, y) == pytest.approx(logme(x, y), abs=1e-3)  # alpha and beta absorb a scale


def test_logme_refuses_mismatched_shapes_and_scores_broken_features_as_nan() -> None:
    y = _classes(20, 2, seed=7)
    with pytest.raises(ValueError, match="one label per image"):
        logme(np.zeros((19, 4)), y)
    broken = _features(y, 4, 1.0, seed=8)
    broken[0, 0] = np.inf
    assert np.isnan(logme(broken, y))


def test_a_backbone_is_pruned_only_when_it_trails_the_best_by_more_than_the_margin() -> None:
    scores = {"good": 0.10, "close": -0.05, "decoy": -0.70}
    assert set(prune_decisions(scores, 0.3)) == {"decoy"}
    assert "trails good (0.100) by 0.800 > margin 0.3" in prune_decisions(scores, 0.3)["decoy"]
    assert set(prune_decisions(scores, 0.1)) == {"close", "decoy"}
    assert prune_decisions(scores, 1.0) == {}
    assert prune_decisions({"alone": -5.0}, 0.0) == {}  # nothing to trail
    # A backbone not scored yet is never pruned; one pruned stays pruned as better scores come in.
    assert set(prune_decisions({**scores, "better": 0.35}, 0.3)) == {"close", "decoy"}
    assert backbone_scores([("a", 0.1), ("a", 0.3), ("b", None), ("c", float("nan"))]) == {"a": 0.3}


def test_ranking_is_on_by_default_with_more_than_two_backbones() -> None:
    assert [ranking_enabled("auto", n) for n in (1, 2, 3)] == [False, False, True]
    assert ranking_enabled("on", 2) and not ranking_enabled("off", 6)
    config = load_config(None)
    assert (config.search.rank_backbones, config.search.rank_margin) == ("auto", 0.3)
    with pytest.raises(ConfigError, match="rank_backbones"):
        load_config({"search": {"rank_backbones": "yes"}})
    with pytest.raises(ConfigError, match="rank_margin"):
        load_config({"search": {"rank_margin": -0.1}})


# --- the searcher, driven by hand (no Ray cluster) ----------------------------------------------------------


def _searcher(tmp_path: Path, rank: str) -> Any:
    import optuna

    from automl_tl.evaluate.ranking import metric_mode
    from automl_tl.sweep.searcher import ranked_search
    from automl_tl.sweep.space import build_param_space, frozen_start_points

    config = load_config({
        "space": {"backbones": ["mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1"]},
        "search": {"num_samples": 60, "rank_backbones": rank, "algorithm": "random"},
    })  # fmt: skip
    space = build_param_space(config)
    search = ranked_search(config, space, tmp_path / "ranking.json", sampler=optuna.samplers.RandomSampler(seed=0),
                           points_to_evaluate=frozen_start_points(config, space))  # fmt: skip
    search.set_search_properties("val_accuracy", metric_mode("val_accuracy"), space)
    return search


@pytest.mark.parametrize("rank", ["auto", "off"])
def test_the_searcher_declines_image_trials_of_a_pruned_backbone_and_nothing_else(tmp_path: Path, rank: str) -> None:
    from optuna.trial import TrialState

    from automl_tl.train.trial_config import TrialConfig

    search = _searcher(tmp_path, rank)
    scores = {"mobilenetv2_100": 0.1, "tf_efficientnet_lite0": 0.0, "tf_efficientnet_lite1": -0.7}
    for i in range(3):  # the three probes, each reporting its backbone's score
        params = search.suggest(f"probe{i}")
        assert params["optimizer"] == "lbfgs"
        search.on_trial_complete(f"probe{i}", {"val_accuracy": 0.8, "transferability": scores[params["backbone"]],
                                               "training_iteration": 1})  # fmt: skip
    proposed = [search.suggest(f"t{i}") for i in range(40)]
    constants = search._constants
    image_trials = [p["backbone"] for p in proposed if not TrialConfig.from_params({**constants, **p}).frozen_features]
    record = json.loads((tmp_path / "ranking.json").read_text(encoding="utf-8"))
    failed = [t for t in search._ot_study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    if rank == "off":
        assert "tf_efficientnet_lite1" in image_trials and not failed and record["pruned"] == {}
        return
    assert "tf_efficientnet_lite1" not in image_trials
    assert {"mobilenetv2_100", "tf_efficientnet_lite0"} <= set(image_trials)
    assert list(record["pruned"]) == ["tf_efficientnet_lite1"]
    # Every declined proposal is a failed Optuna trial (left out of TPE's model), and one was counted for it.
    assert len(failed) == record["declined"]["tf_efficientnet_lite1"] > 0
    assert all(t.params["backbone"] == "tf_efficientnet_lite1" for t in failed)


def test_image_trials_of_a_backbone_wait_while_its_probe_runs(tmp_path: Path) -> None:
    from automl_tl.train.trial_config import TrialConfig

    search = _searcher(tmp_path, "on")
    probes = {f"probe{i}": search.suggest(f"probe{i}") for i in range(3)}  # running side by side, none reported
    later = [search.suggest(f"t{i}") for i in range(12)]
    assert None in later  # image trials deferred: Tune asks again on its next step
    for p in filter(None, later):
        assert TrialConfig.from_params({**search._constants, **p}).frozen_features
    for trial_id, params in probes.items():
        search.on_trial_complete(trial_id, {"val_accuracy": 0.8, "transferability": 0.1, "training_iteration": 1})
    after = [search.suggest(f"u{i}") for i in range(12)]
    assert None not in after
    assert any(not TrialConfig.from_params({**search._constants, **p}).frozen_features for p in after if p)


# --- a real sweep ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_a_sweep_records_scores_and_prunes(
    tmp_path: Path, ray_session: object, hymenoptera_dir: Path, data_cache_dir: Path
) -> None:
    from automl_tl.evaluate.results import build_results
    from automl_tl.report import write_report
    from automl_tl.sweep.driver import run_search

    backbones = ["mobilenetv2_100", "tf_efficientnet_lite0"]
    config = load_config({
        "data": {"source": str(hymenoptera_dir / "train"), "cache_dir": str(data_cache_dir)},
        "space": {"backbones": backbones, "image_sizes": [64], "max_epochs": 2, "batch_sizes": [32],
                  "augmentations": ["none", "light"], "optimizers": ["lbfgs", "adamw"], "heads": ["linear"]},
        # margin 0: whichever backbone scores lower is pruned once both probes have reported
        "search": {"num_samples": 5, "time_budget_s": 300, "max_concurrent_trials": 1, "rank_backbones": "on",
                   "rank_margin": 0.0},
    })  # fmt: skip
    out = tmp_path / "run"
    outcome = run_search(config, out, test_source=str(hymenoptera_dir / "val"), progress=False)
    block = json.loads((out / "summary.json").read_text(encoding="utf-8"))["transferability"]
    assert block["method"] == "logme" and block["enabled"] and set(block["scores"]) == set(backbones)
    assert all(isinstance(block["scores"][b], float) for b in backbones)
    (loser,) = block["pruned"]
    assert loser == min(backbones, key=lambda b: block["scores"][b]) and block["best"] != loser
    with open(out / "leaderboard.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(outcome.rows) == 5
    for row in rows:
        assert float(row["transferability"]) == pytest.approx(block["scores"][row["backbone"]], abs=1e-4)
        assert bool(row["pruned_by_rank"]) == (row["backbone"] == loser)
    # Both probes ran first; after them the pruned backbone only trains heads on its cached features.
    assert {r["backbone"] for r in rows if r["optimizer"] == "lbfgs" and r["feature_cache"] != "unused"} == set(backbones)
    assert all(r["feature_cache"] != "unused" for r in rows if r["backbone"] == loser)

    build_results(out)
    html = write_report(out).read_text(encoding="utf-8")
    section = html.split('<section id="transferability">', 1)[1].split("</section>", 1)[0]
    for name in backbones:
        assert f"<td class=l>{name}</td><td>{block['scores'][name]:.3f}</td>" in section
    assert "trails" in section


def test_the_report_section_escapes_names() -> None:
    from automl_tl.report._page import _transferability

    html = _transferability({"scores": {"<b>x</b>": 0.5, "y": None}, "pruned": {"y": "<i>why</i>"}, "enabled": True,
                             "margin": 0.3, "declined_proposals": {"y": 2}})  # fmt: skip
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "&lt;i&gt;why&lt;/i&gt;" in html and "<b>x" not in html
    assert html.index("&lt;b&gt;x") < html.index(">y<")  # scored first, best first
