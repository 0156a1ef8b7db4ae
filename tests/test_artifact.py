"""Artifact round trip, and each way a saved artifact can be broken: every one is an ArtifactError."""

from __future__ import annotations

import functools
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from automl_tl.inference.artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MemberRecord,
    load_artifact,
    member_from_trial,
    write_artifact,
)
from automl_tl.backbones import create_backbone, get_backbone_spec, source_status
from automl_tl.errors import ArtifactError

BACKBONE = "mobilenetv2_100"
CLASSES = ("ants", "bees")


@functools.lru_cache(maxsize=1)
def _pretrained_body() -> dict[str, torch.Tensor]:
    """Real pretrained features when the weight file is there, else a seeded random body (still valid)."""
    pretrained = source_status(get_backbone_spec(BACKBONE).weights) == "ready"
    torch.manual_seed(0)
    net = create_backbone(BACKBONE, num_classes=2, pretrained=pretrained)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("net.classifier")}


def make_member(
    member_id: str, image_size: int, head: str = "linear", seed: int = 0, temperature: float = 1.0
) -> tuple[MemberRecord, dict[str, torch.Tensor]]:
    """A tiny real member: the shared backbone body with a fresh, seeded head of two classes."""
    torch.manual_seed(seed)
    net = create_backbone(BACKBONE, num_classes=len(CLASSES), pretrained=False, head=head, head_dropout=0.1)
    state = dict(net.state_dict())
    state.update(_pretrained_body())
    record = MemberRecord.create(
        member_id, BACKBONE, len(CLASSES), head=head, head_dropout=0.1, image_size=image_size,
        val_metrics={"accuracy": 0.5}, temperature=temperature, hyperparameters={"lr": 0.01},
    )  # fmt: skip
    return record, state


def unbuildable_member(member_id: str, image_size: int) -> tuple[MemberRecord, dict[str, torch.Tensor]]:
    """A member whose manifest says a linear head but whose weights hold an MLP head: its sha256 checks out,
    so the artifact loads, but building its network raises an ArtifactError ("weights do not fit")."""
    record, _ = make_member(member_id, image_size)
    _, state = make_member(member_id, image_size, head="mlp")
    return record, state


def make_artifact(
    out_dir: Path,
    members: Sequence[tuple[MemberRecord, Mapping[str, torch.Tensor]]],
    weights: Sequence[float] | None = None,
    temperature: float = 1.3,
    decode_max_side: int | None = None,
) -> Path:
    write_artifact(
        out_dir, CLASSES, members, weights or [1.0] * len(members), temperature,
        metrics={"val": {"accuracy": 0.9}}, method="greedy", decode_max_side=decode_max_side,
    )  # fmt: skip
    return out_dir


@pytest.fixture(scope="module")
def members() -> list[tuple[MemberRecord, dict[str, torch.Tensor]]]:
    return [make_member("trial_a", 96), make_member("trial/b", 112, head="mlp", seed=1, temperature=0.8)]


@pytest.fixture()
def artifact_dir(tmp_path: Path, members: list[tuple[MemberRecord, dict[str, torch.Tensor]]]) -> Path:
    return make_artifact(tmp_path / "artifact", members, weights=[3.0, 1.0])


def _edit_manifest(artifact_dir: Path, change: Any) -> None:
    path = artifact_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_round_trip(artifact_dir: Path, members: list[tuple[MemberRecord, dict[str, torch.Tensor]]]) -> None:
    manifest = json.loads((artifact_dir / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["class_names"] == list(CLASSES)
    assert manifest["ensemble"] == {"method": "greedy", "weights": [0.75, 0.25], "temperature": 1.3}
    assert {"torch", "timm", "automl_tl"} <= set(manifest["versions"])
    first = manifest["members"][0]
    assert first["backbone"] == BACKBONE and first["image_size"] == 96 and first["head"] == "linear"
    assert first["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and first["preprocessing"]["interpolation"] == "bilinear"
    assert len(first["sha256"]) == 64 and (artifact_dir / first["weight_file"]).is_file()
    assert "/" not in manifest["members"][1]["weight_file"]  # the id "trial/b" is made safe for a file name

    artifact = load_artifact(artifact_dir)
    assert load_artifact(artifact_dir / MANIFEST_NAME).members == artifact.members  # the manifest path works too
    assert artifact.class_names == CLASSES and artifact.weights == (0.75, 0.25) and artifact.temperature == 1.3
    assert [m.member_id for m in artifact.members] == ["trial_a", "trial/b"]
    assert artifact.members[1].temperature == 0.8 and artifact.members[1].hyperparameters == {"lr": 0.01}
    assert artifact.metrics == {"val": {"accuracy": 0.9}}
    x = torch.rand(2, 3, 96, 96)
    for model, (record, state) in zip(artifact.build_models(), members):
        original = create_backbone(BACKBONE, num_classes=2, pretrained=False, head=record.head, head_dropout=0.1)
        original.load_state_dict(state)
        original.eval()
        with torch.inference_mode():
            assert torch.equal(model(x), original(x))
        assert not model.training


def test_loading_never_unpickles(artifact_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert len(load_artifact(artifact_dir).build_models()) == 2


def test_tampered_weight_file(artifact_dir: Path) -> None:
    name = load_artifact(artifact_dir).members[0].weight_file
    data = bytearray((artifact_dir / name).read_bytes())
    data[-1] ^= 0xFF
    (artifact_dir / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name}: sha256 mismatch for member trial_a"):
        load_artifact(artifact_dir)


def test_file_replaced_after_loading_is_caught_at_build(artifact_dir: Path) -> None:
    artifact = load_artifact(artifact_dir)
    first, second = (artifact_dir / m.weight_file for m in artifact.members)
    first.write_bytes(second.read_bytes())  # a valid safetensors file, but not the one the manifest lists
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        artifact.build_models()


def test_missing_weight_file(artifact_dir: Path) -> None:
    name = load_artifact(artifact_dir).members[1].weight_file
    (artifact_dir / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing"):
        load_artifact(artifact_dir)


def test_missing_manifest_or_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_artifact(tmp_path)


def test_unknown_format_version(artifact_dir: Path) -> None:
    _edit_manifest(artifact_dir, lambda m: m.update(format_version=2))
    with pytest.raises(ArtifactError, match="unknown format version 2; this automl_tl reads version 1"):
        load_artifact(artifact_dir)


def test_class_count_mismatch(artifact_dir: Path) -> None:
    _edit_manifest(artifact_dir, lambda m: m.update(class_names=["ants", "bees", "wasps"]))
    with pytest.raises(ArtifactError, match=r"members\[0\]: class-count mismatch: num_classes is 2, .* lists 3"):
        load_artifact(artifact_dir)


def test_class_count_mismatch_with_the_weights(artifact_dir: Path) -> None:
    def three_classes(m: dict[str, Any]) -> None:
        m["class_names"] = ["ants", "bees", "wasps"]
        for member in m["members"]:
            member["num_classes"] = 3

    _edit_manifest(artifact_dir, three_classes)  # consistent manifest, but the weights have a 2-class head
    with pytest.raises(ArtifactError, match="class-count mismatch: net.classifier.1.weight holds 2 outputs"):
        load_artifact(artifact_dir).build_model(0)


def test_weights_that_do_not_fit_the_declared_head(artifact_dir: Path) -> None:
    _edit_manifest(artifact_dir, lambda m: m["members"][1].update(head="linear"))  # saved with an mlp head
    artifact = load_artifact(artifact_dir)
    artifact.build_model(0)
    with pytest.raises(ArtifactError, match="weights do not fit mobilenetv2_100 with a linear head of 2 classes"):
        artifact.build_model(1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format="something-else"), "field 'format' must be"),
        (lambda m: m["members"][0].pop("sha256"), r"members\[0\]: missing field 'sha256'"),
        (lambda m: m["members"][0].update(weight_file="../elsewhere.safetensors"), "plain file name"),
        (lambda m: m["members"][0].update(image_size=128), "image_size 128 differs"),
        (lambda m: m["ensemble"].update(weights=[1.0]), "ensemble.weights must hold 2 numbers"),
        (lambda m: m["ensemble"].update(temperature=0), "ensemble.temperature: must be positive and finite, got 0"),
        (lambda m: m["ensemble"].update(weights=[1.0, -1.0]), r"ensemble.weights\[1\]: must be >= 0.0, got -1.0"),
        (lambda m: m["members"][0].update(sha256="abc"), r"members\[0\].sha256: must be 64 hex digits, got 'abc'"),
        (lambda m: m["members"][0]["preprocessing"].update(mean=[0.5]), r"preprocessing.mean: must hold 3 numbers"),
        (lambda m: m.update(class_names=["ants", "ants"]), "class_names: must be distinct"),
        (lambda m: m.update(members=[]), "members: needs at least 1 value"),
        (lambda m: m["members"][1].update(member_id="trial_a"), "member ids are not unique"),
        (lambda m: m.update(decode={"max_side": -1}), "decode.max_side"),
    ],
)
def test_malformed_manifest(artifact_dir: Path, change: Any, message: str) -> None:
    _edit_manifest(artifact_dir, change)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact_dir)


def test_manifest_mistakes_are_reported_together(artifact_dir: Path) -> None:
    def three(m: dict[str, Any]) -> None:
        m["members"][0]["num_classes"] = "two"
        m["members"][1].pop("backbone")
        m["ensemble"]["temperature"] = -1

    _edit_manifest(artifact_dir, three)
    with pytest.raises(ArtifactError) as info:
        load_artifact(artifact_dir)
    assert str(info.value).splitlines() == [
        f"{artifact_dir / MANIFEST_NAME}: 3 problems:",
        "  members[0].num_classes: expected an integer, got 'two'",
        "  members[1]: missing field 'backbone'",
        "  ensemble.temperature: must be positive and finite, got -1.0",
    ]


def test_manifest_not_json(artifact_dir: Path) -> None:
    (artifact_dir / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(artifact_dir)


def test_registry_drift_is_refused(artifact_dir: Path) -> None:
    _edit_manifest(artifact_dir, lambda m: m["members"][0]["spec"].update(timm_kwargs={"pad_type": ""}))
    with pytest.raises(ArtifactError, match="was saved with timm_kwargs"):
        load_artifact(artifact_dir).build_model(0)


def test_write_checks_its_input(
    tmp_path: Path, members: list[tuple[MemberRecord, dict[str, torch.Tensor]]]
) -> None:
    with pytest.raises(ArtifactError, match="2 ensemble weights for 1 members"):
        write_artifact(tmp_path / "a", CLASSES, members[:1], [0.5, 0.5], 1.0)
    with pytest.raises(ArtifactError, match="num_classes is 2, but there are 3 class names"):
        write_artifact(tmp_path / "a", ("a", "b", "c"), members[:1], [1.0], 1.0)
    with pytest.raises(ArtifactError, match="appears twice"):
        write_artifact(tmp_path / "a", CLASSES, [members[0], members[0]], [1.0, 1.0], 1.0)
    with pytest.raises(ArtifactError, match="temperature must be positive"):
        write_artifact(tmp_path / "a", CLASSES, members[:1], [1.0], -1.0)
    make_artifact(tmp_path / "b", members[:1])
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(tmp_path / "b", CLASSES, members[:1], [1.0], 1.0, overwrite=False)


def test_member_from_trial_folder(
    tmp_path: Path, members: list[tuple[MemberRecord, dict[str, torch.Tensor]]]
) -> None:
    from safetensors.torch import save_file

    record, state = members[1]
    trial = tmp_path / "trials" / "trial_0007"
    trial.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(trial / "model.safetensors"))
    info = {  # what a sweep trial leaves: its config, then what the artifact needs
        "backbone": BACKBONE, "freeze_depth": 8, "learning_rate": 0.01, "head": "mlp", "head_dropout": 0.1,
        "image_size": 112, "num_classes": 2, "class_names": list(CLASSES),
        "preprocessing": dict(record.preprocessing), "spec": dict(record.spec), "val_metrics": {"accuracy": 0.75},
    }  # fmt: skip
    (trial / "trial.json").write_text(json.dumps(info))
    got, got_state = member_from_trial(trial)
    assert got.member_id == "trial_0007" and got.head == "mlp" and got.image_size == 112
    assert got.val_metrics == {"accuracy": 0.75} and got.hyperparameters["learning_rate"] == 0.01
    art = make_artifact(tmp_path / "artifact", [(got, got_state)])
    assert load_artifact(art).build_model(0) is not None
    (trial / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        member_from_trial(trial)
