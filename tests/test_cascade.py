"""The cascade (``mode="cascade"``) and selection under a latency budget, in plain numpy and torch: no Ray.

    .venv/bin/python -m pytest -q tests/test_cascade.py
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from automl_tl.errors import ArtifactError, ConfigError
from automl_tl.config import load_config
from automl_tl.evaluate.ensemble import EnsembleSelection, cascade_threshold, choose_cascade, select_ensemble, select_greedy
from automl_tl.inference.artifact import load_artifact, write_artifact
from automl_tl.inference.calibrate import apply_temperature
from automl_tl.inference.core import MemberRunner, Members, Plan, Preprocessor, plan_for
from automl_tl.inference.latency import LATENCY_BATCH_SIZES, latency_key, trial_latency_ms
from automl_tl.inference.predictor import Predictor
from automl_tl.serve._args import AppArgs
from automl_tl.serve._replica import Forward, Row

from .test_artifact import CLASSES, make_member

CONFIDENCE = np.array([0.99, 0.97, 0.95, 0.90, 0.85, 0.80, 0.70, 0.60, 0.55, 0.51])
FIRST_RIGHT = np.array([1, 1, 1, 1, 0, 1, 1, 0, 1, 1], dtype=bool)


def _two_class(confidence: np.ndarray, right: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, 2) probabilities whose top probability is ``confidence``, on the label where ``right``."""
    top = np.where(right, labels, 1 - labels)
    probs = np.empty((len(labels), 2))
    probs[np.arange(len(labels)), top] = confidence
    probs[np.arange(len(labels)), 1 - top] = 1 - confidence
    return probs


def test_the_threshold_is_the_lowest_that_keeps_accuracy_within_the_tolerance() -> None:
    labels = np.zeros(10, dtype=np.int64)
    first = _two_class(CONFIDENCE, FIRST_RIGHT, labels)
    then = _two_class(np.full(10, 0.9), np.ones(10, bool), labels)  # the ensemble is always right
    # No tolerance: the cheap member may answer only while it is never wrong: rows of confidence >= 0.90.
    assert cascade_threshold(first, then, labels, 0.0) == (0.90, 1.0, 0.6)
    # Ten points: one mistake is allowed; at 0.60 a second one would be, so it stops at 0.70.
    threshold, accuracy, rate = cascade_threshold(first, then, labels, 0.10) or (0.0, 0.0, 0.0)
    assert (threshold, accuracy, rate) == (0.70, 0.9, pytest.approx(0.3))
    # Rows where the cheap member is right and the ensemble wrong do not pay for its losses: with the ensemble
    # wrong on row 0, accuracy at 0.85 would equal the ensemble's, yet row 4 is a loss, so it stops at 0.90.
    unlucky = np.ones(10, bool)
    unlucky[0] = False
    weaker = _two_class(np.full(10, 0.9), unlucky, labels)
    assert cascade_threshold(first, weaker, labels, 0.0) == (0.90, 1.0, 0.6)
    # A cheap member wrong at its most confident row cannot answer anything alone.
    wrong_top = FIRST_RIGHT.copy()
    wrong_top[0] = False
    assert cascade_threshold(_two_class(CONFIDENCE, wrong_top, labels), then, labels, 0.0) is None


def test_the_cascade_member_is_the_one_of_least_expected_latency() -> None:
    labels = np.zeros(10, dtype=np.int64)
    halves = np.arange(10) < 5
    # Each ensemble member is sure and right on one half, unsure and wrong on the other; together always right.
    e1 = _two_class(np.where(halves, 0.9, 0.6), halves, labels)
    e2 = _two_class(np.where(halves, 0.6, 0.9), ~halves, labels)
    sure = FIRST_RIGHT.copy()
    sure[4] = True  # answers alone down to 0.70 with no mistake: escalates 3 rows of 10
    probs = {"e1": e1, "e2": e2, "c1": _two_class(CONFIDENCE, FIRST_RIGHT, labels),
             "c2": _two_class(CONFIDENCE, sure, labels), "slow": _two_class(np.full(10, 0.9), np.ones(10, bool), labels)}  # fmt: skip
    latency = {"e1": 10.0, "e2": 10.0, "c1": 2.0, "c2": 5.0, "slow": 25.0}
    ensemble = EnsembleSelection(("e1", "e2"), (0.5, 0.5), "greedy", "log_loss", 0.0)
    temperatures = dict.fromkeys(probs, 1.0)
    choice = choose_cascade(probs, labels, temperatures, ensemble, 1.0, latency, 0.0)
    # c1: 2 + 0.6 * 20 = 14 ms a row; c2: 5 + 0.3 * 20 = 11; e1 or e2: 10 + 0.5 * 10 = 15 (their own output is
    # reused); "slow", always right, costs more than the ensemble itself.
    assert choice is not None and choice.member == "c2" and choice.threshold == 0.70
    assert choice.escalation_rate == pytest.approx(0.3) and choice.expected_latency_ms == pytest.approx(11.0)
    assert choice.accuracy == choice.ensemble_accuracy == 1.0
    # The cheap member inside the ensemble: only the other member's time is added for an escalated row.
    inside = choose_cascade({"e1": probs["c2"], "e2": e2}, labels, temperatures, ensemble, 1.0, latency, 0.0)
    assert inside is not None and inside.member == "e1" and inside.expected_latency_ms == pytest.approx(10.0 + 0.3 * 10.0)
    # Nothing cheaper than the ensemble: no cascade.
    alone = EnsembleSelection(("e1",), (1.0,), "greedy", "log_loss", 0.0)
    assert choose_cascade({"e1": e1, "slow": probs["slow"]}, labels, temperatures, alone, 1.0, latency, 0.0) is None


def test_selection_under_a_latency_budget_skips_the_members_that_do_not_fit() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    noisy = {t: np.eye(3)[np.where(rng.random(60) < q, labels, (labels + 1) % 3)] * 0.8 + 0.2 / 3
             for t, q in (("big", 0.95), ("mid", 0.85), ("small", 0.8))}  # fmt: skip
    latency = {"big": 50.0, "mid": 12.0, "small": 5.0}
    free = select_greedy(noisy, labels, 3)
    assert "big" in free.members
    tight = select_greedy(noisy, labels, 3, latency_ms=latency, budget_ms=20.0)
    assert "big" not in tight.members and sum(latency[t] for t in tight.members) <= 20.0
    # A budget nothing fits: the cheapest trial alone, as the fastest there is.
    assert select_greedy(noisy, labels, 3, latency_ms=latency, budget_ms=1.0).members == ("small",)


def test_the_config_can_start_greedy_selection_from_several_best_trials() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    noisy = {t: np.eye(3)[np.where(rng.random(60) < q, labels, (labels + 1) % 3)] * 0.8 + 0.2 / 3
             for t, q in (("big", 0.95), ("mid", 0.85), ("small", 0.8))}  # fmt: skip
    search = load_config({"search": {"ensemble_size": 6, "ensemble_init_best": 3}}).search
    chosen = select_ensemble(noisy, labels, search.ensemble_method, search.ensemble_size,
                             init_best=search.ensemble_init_best)  # fmt: skip
    assert set(chosen.members) == {"big", "mid", "small"}  # from one it keeps fewer:
    assert len(select_ensemble(noisy, labels, "greedy", 6).members) < 3
    with pytest.raises(ConfigError, match="ensemble_init_best <= ensemble_size must hold, but got ensemble_init_best=4"):
        load_config({"search": {"ensemble_size": 3, "ensemble_init_best": 4}})


def test_latency_is_measured_per_architecture_at_batch_1_and_8() -> None:
    info = {"backbone": "mobilenetv2_100", "num_classes": 2, "head": "linear", "preprocessing": {"input_size": 64}}
    figures = trial_latency_ms({"t1": info, "t2": dict(info)}, repeats=1)
    assert figures["t1"] == figures["t2"]  # one architecture, timed once
    assert set(figures["t1"]) == {latency_key(b) for b in LATENCY_BATCH_SIZES} and min(figures["t1"].values()) > 0


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (60 + 7 * i, 70, 3), dtype=np.uint8) for i in range(4)]


def _cascade_artifact(out: Path, pixels: list[np.ndarray], cheap_weight: float) -> Path:
    """Members a (the cheap one), b and c; the threshold splits ``pixels`` between a and the ensemble."""
    members = [make_member("a", 64, seed=4), make_member("b", 72, head="mlp", seed=1, temperature=0.7),
               make_member("c", 64, seed=2, temperature=1.2)]  # fmt: skip
    weights = [cheap_weight, 1.0, 1.0]
    write_artifact(out, CLASSES, members, weights, 1.3, metrics={"best_member": "b"})
    first = Members(load_artifact(out)).probabilities(pixels, [0])[0]
    confidence = np.sort(apply_temperature(first, 1.0).max(axis=1))
    threshold = float((confidence[1] + confidence[2]) / 2)  # half the rows each way
    write_artifact(out, CLASSES, members, weights, 1.3, metrics={"best_member": "b"},
                   cascade={"member_id": "a", "threshold": threshold})  # fmt: skip
    return out


def test_a_batch_split_between_cheap_member_and_ensemble_answers_as_row_by_row(
    tmp_path: Path, pixels: list[np.ndarray]
) -> None:
    art = _cascade_artifact(tmp_path / "artifact", pixels, cheap_weight=1.0)  # its output is reused when escalated
    cascade = Predictor.load(art, mode="cascade")
    assert cascade.plan.member_ids == ("a", "b", "c") and cascade.plan.threshold is not None
    together, escalated = cascade._answers(pixels, len(pixels), None)
    assert 0 < escalated.sum() < len(pixels)  # the batch really splits
    one_by_one = np.concatenate([cascade.predict_proba([p], batch_size=1) for p in pixels])
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    # Confident rows are the cheap member's own calibrated answer; the others the ensemble's.
    alone = cascade.predict_proba(pixels, member="a")
    ensemble = cascade._members.answer(pixels, plan_for(cascade.artifact, "ensemble"))[0]  # the members built
    np.testing.assert_allclose(together[~escalated], alone[~escalated], atol=1e-6)
    np.testing.assert_allclose(together[escalated], ensemble[escalated], atol=1e-6)

    # A Serve replica's batch: the same rows escalate, and each row, calibrated alone, gives the same answer.
    plan = plan_for(load_artifact(art), "cascade")
    forward = Forward.serving(plan.artifact, plan.member_indices, AppArgs(artifact=str(art), max_batch_size=4), plan)
    preprocess = Preprocessor(plan.preprocessing)
    inputs = [preprocess(p) for p in pixels]

    async def batch() -> list[tuple[tuple[np.ndarray, ...], int, float]]:
        return list(await asyncio.gather(*await forward.start(inputs)))

    rows = asyncio.run(batch())
    served = np.concatenate([plan.calibrate([r[None, :] for r in row[0]]) for row in rows])
    np.testing.assert_allclose(served, together, atol=1e-6)
    stats = forward.counters.to_dict()
    assert stats["escalated"] == int(escalated.sum()) and stats["escalation_rate"] == round(escalated.mean(), 4)
    assert [set(m) for m in forward.latency_ms] == [{"batch_1", "batch_8"}] * 3  # timed when it started


def test_cascade_needs_the_manifests_section_and_a_known_member(tmp_path: Path) -> None:
    members = [make_member("a", 96), make_member("b", 112, head="mlp", seed=1)]
    plain = tmp_path / "plain"
    write_artifact(plain, CLASSES, members, [1.0, 1.0], 1.0)
    with pytest.raises(ConfigError, match="mode 'cascade' needs the manifest's cascade section"):
        Predictor.load(plain, mode="cascade")
    with pytest.raises(ArtifactError, match="cascade.member_id 'z' is not a member"):
        write_artifact(tmp_path / "bad", CLASSES, members, [1.0, 1.0], 1.0, cascade={"member_id": "z", "threshold": 0.5})
    manifest = json.loads((plain / "manifest.json").read_text())
    assert "cascade" not in manifest and manifest["members"][0]["latency_ms"] == {}
    with pytest.raises(ConfigError, match="cannot be exported"):
        from automl_tl.inference.export import build_export_graph

        cascade = tmp_path / "cascade"
        write_artifact(cascade, CLASSES, members, [1.0, 1.0], 1.0, cascade={"member_id": "a", "threshold": 0.9})
        build_export_graph(load_artifact(cascade), mode="cascade")


class _Timed:
    """A stand-in member: the two-class logits (label, 0) for every row, after a sleep that depends on how many
    torch threads it runs on; records the thread count and batch size of each call."""

    def __init__(self, label: float, one_thread_s: float = 0.0, more_threads_s: float = 0.0) -> None:
        import torch

        class Net(torch.nn.Module):
            def forward(net, x: torch.Tensor) -> torch.Tensor:  # noqa: N805 - the outer self is the recorder
                self.calls.append((torch.get_num_threads(), int(x.shape[0])))
                time.sleep(one_thread_s if torch.get_num_threads() == 1 else more_threads_s)
                return torch.tensor([[label, 0.0]]).repeat(x.shape[0], 1)

        self.calls: list[tuple[int, int]] = []
        self.net = Net()


def lone_request(nets: list[torch.nn.Module], records: list[list[Any]], plan: Plan | None = None) -> tuple[Forward, list[Row]]:
    """A replica of two lanes on two threads over ``nets`` (whose ``records`` are emptied once it has started),
    and its answer to one lone request of a blank 8 px image per member."""
    item = tuple(torch.zeros(3, 8, 8) for _ in nets)
    before = torch.get_num_threads()
    try:
        forward = Forward(lambda: MemberRunner(nets), threads=2, lanes=2, example=lambda: item, plan=plan)
        for record in records:
            record.clear()
        rows = asyncio.run(forward.solo(lambda: [item]))
    finally:
        torch.set_num_threads(before)
    return forward, rows


def _stand_in_cascade(threshold: float) -> Plan:
    """A cascade over two stand-in members; the plan reads only its members, temperatures and threshold."""
    return Plan(cast(Any, None), "cascade", (0, 1), (1.0, 1.0), 1.0, "cascade-test", 1.0, threshold)


def test_an_escalated_row_runs_the_cheap_member_once_and_the_rest_only_on_it() -> None:
    cheap, other = _Timed(3.0), _Timed(-1.0)  # the cheap member's top probability: sigmoid(3) = 0.953
    runner = MemberRunner([cheap.net, other.net])
    item = (torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    confident = runner.run([item] * 3, _stand_in_cascade(0.9))
    assert [len(cheap.calls), len(other.calls), confident.escalated] == [1, 0, 0]
    cheap.calls.clear()
    escalated = runner.run([item] * 3, _stand_in_cascade(0.99))
    assert [c[1] for c in cheap.calls] == [3] and [c[1] for c in other.calls] == [3] and escalated.escalated == 3
    assert np.allclose(escalated.member_probs[0], confident.member_probs[0])  # the cheap output reused, not rerun


@pytest.mark.parametrize("one_thread_faster", [True, False])
def test_a_cascades_lone_request_runs_on_the_thread_count_measured_faster(one_thread_faster: bool) -> None:
    # The ensemble's lone request has its way chosen by timing when the replica starts; a cascade's used to run
    # on every thread whatever they cost, which on a busy machine made it slower than the whole ensemble.
    one, wide = (0.01, 0.03) if one_thread_faster else (0.03, 0.01)
    cheap, other = _Timed(3.0, one, wide), _Timed(-1.0, one, wide)
    forward, rows = lone_request([cheap.net, other.net], [cheap.calls, other.calls], _stand_in_cascade(0.9))
    chosen = forward.counters.to_dict()["lone_request"]
    assert (chosen["one_thread_ms"] < chosen["wide_ms"]) is one_thread_faster
    assert forward.lone_threads == chosen["cascade_threads"] == (1 if one_thread_faster else 2)
    assert forward.member_lanes is None  # the cheap member first: the members never run side by side
    assert cheap.calls == [(forward.lone_threads, 1)] and other.calls == []  # confident: the cheap member alone
    assert rows[0][0][0][0] == pytest.approx(1.0 / (1.0 + np.exp(-3.0)))
