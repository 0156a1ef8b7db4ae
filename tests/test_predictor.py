"""The Predictor on real hymenoptera images gives the evaluation loop's answers, for every input format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from automl_tl.inference.artifact import load_artifact, write_artifact
from automl_tl.backbones import memory_format_for
from automl_tl.cli import main
from automl_tl.config import DataConfig
from automl_tl.data import load_dataset
from automl_tl.inference.calibrate import apply_temperature, combine
from automl_tl.errors import ArtifactError, ConfigError, DatasetError
from automl_tl.evaluate.metrics import classification_metrics
from automl_tl.inference.predictor import Evaluation, Predictor, expand_image_paths, load_image, match_class_names
from automl_tl.inference.transforms import Preprocessing, to_tensor_batch

from .test_artifact import CLASSES, make_artifact, make_member, unbuildable_member

pytestmark = pytest.mark.needs_shared_data


@pytest.fixture(scope="module")
def images(hymenoptera_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four val images per class, copied into a small labelled folder DIR/<class>/*.jpg."""
    root = tmp_path_factory.mktemp("hym")
    for name in CLASSES:
        (root / name).mkdir()
        for src in sorted((hymenoptera_dir / "val" / name).glob("*.jpg"))[:4]:
            shutil.copy(src, root / name / src.name)
    return root


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two members with different input sizes and heads, unequal weights and a temperature."""
    members = [make_member("a", 96), make_member("b", 112, head="mlp", seed=1, temperature=0.7)]
    return make_artifact(tmp_path_factory.mktemp("art") / "artifact", members, weights=[2.0, 1.0], temperature=1.4)


@pytest.fixture(scope="module")
def predictor(artifact_dir: Path) -> Predictor:
    return Predictor.load(artifact_dir)


def _evaluation_loop(artifact_dir: Path, arrays: list[np.ndarray]) -> np.ndarray:
    """What training's evaluation path computes: eval transform, forward, softmax, then the ensemble."""
    artifact = load_artifact(artifact_dir)
    probs = []
    fmt = memory_format_for(torch.device("cpu"))  # training evaluates in the layout it trains in
    for member, model in zip(artifact.members, artifact.build_models()):
        batch = to_tensor_batch([a.copy() for a in arrays], Preprocessing.from_dict(member.preprocessing))
        with torch.inference_mode():
            out = model.to(memory_format=fmt)(batch.contiguous(memory_format=fmt))
            probs.append(torch.softmax(out.double(), dim=1).numpy())
    return apply_temperature(combine(probs, artifact.weights), artifact.temperature)


def test_same_answers_as_the_evaluation_loop(images: Path, artifact_dir: Path, predictor: Predictor) -> None:
    paths = expand_image_paths([images])
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    expected = _evaluation_loop(artifact_dir, arrays)
    got = predictor.predict_proba(paths, batch_size=3)
    # The Predictor folds batch norms into their convolutions, which reorders float arithmetic (2e-6 seen).
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (8, 2) and np.allclose(got.sum(axis=1), 1.0)
    # every input form gives the same answer
    np.testing.assert_allclose(predictor.predict_proba(arrays), got, atol=1e-6)
    np.testing.assert_allclose(predictor.predict_proba([Image.open(p) for p in paths]), got, atol=1e-6)
    np.testing.assert_allclose(predictor.predict_proba(str(p) for p in paths), got, atol=1e-6)


def test_same_answers_as_the_data_sets_evaluation_loop(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the data set's decoding (shrunk to cache_max_side), files predict exactly as the cache trained."""
    from automl_tl.data import load_dataset

    max_side = 160
    members = [make_member("a", 96), make_member("c", 96, seed=2)]
    art = make_artifact(tmp_path / "artifact", members, decode_max_side=max_side)
    dataset = load_dataset(str(images), DataConfig(cache_max_side=max_side, cache_dir=str(tmp_path / "cache")),
                           progress=False)  # fmt: skip
    arrays = [dataset.image(i) for i in range(len(dataset))]
    assert max(max(a.shape[:2]) for a in arrays) == max_side
    expected = _evaluation_loop(art, arrays)
    predictor = Predictor.load(art)
    files = [images / p for p in dataset.paths]
    np.testing.assert_allclose(predictor.predict_proba(files), expected, atol=1e-6)


def test_predict_returns_sorted_top_k(images: Path, predictor: Predictor) -> None:
    paths = expand_image_paths([images])
    probs = predictor.predict_proba(paths)
    predictions = predictor.predict(paths, top_k=5)
    for p, pred in zip(probs, predictions):
        assert len(pred.labels) == 2 and set(pred.labels) == set(CLASSES)  # top_k capped at the class count
        assert pred.probabilities[0] >= pred.probabilities[1]
        assert pred.label == CLASSES[int(np.argmax(p))] and pred.probability == pytest.approx(p.max())
    assert [len(p.labels) for p in predictor.predict(paths[:2], top_k=1)] == [1, 1]


def test_batch_size_does_not_change_answers(images: Path, predictor: Predictor) -> None:
    paths = expand_image_paths([images])
    np.testing.assert_allclose(predictor.predict_proba(paths, batch_size=1), predictor.predict_proba(paths), atol=1e-6)


def test_single_member_uses_its_own_temperature(images: Path, artifact_dir: Path, predictor: Predictor) -> None:
    paths = expand_image_paths([images])[:3]
    artifact = load_artifact(artifact_dir)
    model = artifact.build_model(1)
    batch = to_tensor_batch([load_image(p) for p in paths], Preprocessing.from_dict(artifact.members[1].preprocessing))
    with torch.inference_mode():
        expected = torch.softmax(model(batch).double() / 0.7, dim=1).numpy()
    np.testing.assert_allclose(predictor.predict_proba(paths, member="b"), expected, atol=1e-6)
    batches = predictor.preprocess(paths)
    assert [tuple(b.shape) for b in batches] == [(3, 3, 96, 96), (3, 3, 112, 112)]  # per-member sizes


def test_image_inputs(images: Path) -> None:
    gray = np.full((20, 30), 128, dtype=np.uint8)
    assert load_image(gray).shape == (20, 30, 3)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent: white, as the data set does
    assert (load_image(rgba) == 255).all()
    big = np.zeros((400, 200, 3), dtype=np.uint8)
    assert load_image(big, max_side=100).shape == (100, 50, 3)
    with pytest.raises(DatasetError, match="must be uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(DatasetError, match="cannot read image"):
        load_image(images / "missing.jpg")
    (images / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="cannot decode image"):
        load_image(images / "notes.txt")
    (images / "notes.txt").unlink()
    with pytest.raises(DatasetError, match="no such file"):
        expand_image_paths([images / "nope"])


def test_class_names_are_matched_by_name() -> None:
    assert match_class_names(["ants", "bees"], ["bees", "ants"], "data").tolist() == [1, 0]
    with pytest.raises(DatasetError, match="classes unknown to the artifact: wasps; artifact classes absent"):
        match_class_names(["ants", "bees"], ["ants", "wasps"], "data")


def test_cli_predict(
    images: Path, artifact_dir: Path, predictor: Predictor, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = [str(images / "ants"), str(images / "bees")]
    assert main(["predict", str(artifact_dir), *folders, "--json", "--top-k", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    paths = expand_image_paths([images])
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    for row, pred in zip(rows, predictor.predict(paths, top_k=1)):
        assert row["labels"] == list(pred.labels) and row["probabilities"] == pytest.approx(pred.probabilities)
    assert main(["predict", str(artifact_dir), str(images)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 8


def test_cli_evaluate(
    images: Path, artifact_dir: Path, predictor: Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("AUTOML_TL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(artifact_dir), "--data", str(images), "--json", str(out), "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 8 and metrics["class_names"] == list(CLASSES)
    assert "acc" in capsys.readouterr().out
    # a labelled set with other classes is a one-line error
    other = tmp_path / "other"
    shutil.copytree(images / "ants", other / "ants")
    shutil.copytree(images / "bees", other / "wasps")
    assert main(["evaluate", str(artifact_dir), "--data", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "class names do not match" in err and "wasps" in err


def test_cli_evaluate_scores_a_split_as_the_run_that_built_the_artifact_drew_it(
    images: Path, artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Drawn with the default settings instead, "test" would hold other images, some of the run's training ones."""
    monkeypatch.setenv("AUTOML_TL_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(artifact_dir, run / "artifact")
    run_data = DataConfig(source=str(images), val_fraction=0.25, test_fraction=0.5, seed=3)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": str(images), "val_fraction": 0.25,
                                                              "test_fraction": 0.5, "seed": 3}}))  # fmt: skip
    drawn = load_dataset(str(images), run_data, progress=False)
    default_test = load_dataset(str(images), DataConfig(source=str(images)), progress=False).indices("test")
    assert len(drawn.indices("test")) != len(default_test)  # else this test could not tell them apart

    def evaluate(*extra: str) -> int:
        out = tmp_path / "metrics.json"
        assert main(["evaluate", str(run / "artifact"), "--data", str(images), "--split", "test", "--quiet",
                     "--json", str(out), *extra]) == 0  # fmt: skip
        return int(json.loads(out.read_text())["n"])

    # Data the run did not split (another data id): drawn afresh with the run's settings.
    (run / "data.json").write_text(json.dumps({"source": str(images), "data_id": "another", "test": [0]}))
    assert evaluate() == len(drawn.indices("test"))
    assert "drawn with the run's data settings" in capsys.readouterr().err
    # The run's own data: exactly the rows its data.json lists.
    (run / "data.json").write_text(json.dumps({"source": str(images), "data_id": Path(drawn.cache_path).stem,
                                               "test": [0, 5, 7]}))  # fmt: skip
    assert evaluate() == 3
    assert "the run's own" in capsys.readouterr().err
    # --config names other settings; an artifact outside any run directory uses the defaults.
    (tmp_path / "other.yaml").write_text("data: {val_fraction: 0.15, test_fraction: 0.15}\n")
    assert evaluate("--config", str(tmp_path / "other.yaml")) == len(default_test)
    out = tmp_path / "alone.json"
    assert main(["evaluate", str(artifact_dir), "--data", str(images), "--split", "test", "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == len(default_test)
    assert "default data settings" in capsys.readouterr().err


def test_a_weight_0_member_is_never_built_nor_run_in_ensemble_mode(images: Path, tmp_path: Path) -> None:
    """The artifact keeps the best trial at weight 0 to serve it alone; here that member cannot even be built,
    so an ensemble Predictor that built or ran it would raise."""
    members = [make_member("a", 96), make_member("b", 112, head="mlp", seed=1), unbuildable_member("z", 96)]
    art = make_artifact(tmp_path / "artifact", members, weights=[2.0, 1.0, 0.0], temperature=1.4)
    paths = expand_image_paths([images])[:4]
    predictor = Predictor.load(art)  # mode="ensemble"
    assert predictor.plan.member_ids == ("a", "b")
    kept = make_artifact(tmp_path / "kept", members[:2], weights=[2.0, 1.0], temperature=1.4)
    np.testing.assert_allclose(predictor.predict_proba(paths), Predictor.load(kept).predict_proba(paths), atol=1e-9)
    with pytest.raises(ArtifactError, match="weights do not fit"):  # asked for by name, it is built, and fails
        predictor.predict_proba(paths, member="z")


def test_mode_selects_the_best_member_or_the_ensemble(images: Path, tmp_path: Path) -> None:
    members = [make_member("a", 96), make_member("b", 112, head="mlp", seed=1, temperature=0.7)]
    art = tmp_path / "artifact"
    write_artifact(art, CLASSES, members, [2.0, 1.0], 1.4, metrics={"best_member": "b"})
    paths = expand_image_paths([images])[:4]
    best = Predictor.load(art, mode="best")
    assert best.mode == "best" and best.plan.member_ids == ("b",) and best.plan.temperature == 0.7
    np.testing.assert_allclose(best.predict_proba(paths), Predictor.load(art).predict_proba(paths, member="b"))
    ensemble = Predictor.load(art, mode="ensemble")
    assert ensemble.plan.member_ids == ("a", "b")
    assert not np.allclose(ensemble.predict_proba(paths), best.predict_proba(paths))
    with pytest.raises(ConfigError, match="mode must be one of best, ensemble, cascade, got 'median'"):
        Predictor.load(art, mode="median")  # type: ignore[arg-type]


def test_files_are_decoded_by_the_data_sets_decoder(images: Path, tmp_path: Path) -> None:
    """A palette PNG with transparency, a 16-bit greyscale PNG and an EXIF-rotated JPEG give the pixels the
    data set's decoder gives (the one serving uses too)."""
    import sys

    from automl_tl.data._decode import decode

    photo = Image.open(expand_image_paths([images])[0]).convert("RGB")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("palette.png", "deep.png", "rotated.jpg"):
        payload = (tmp_path / name).read_bytes()
        for max_side in (None, 64):
            decoded = decode(payload, max_side or sys.maxsize, 89_478_485)
            want = np.frombuffer(decoded.pixels or b"", np.uint8).reshape(decoded.height, decoded.width, 3)
            assert np.array_equal(load_image(tmp_path / name, max_side), want), (name, max_side)


def test_evaluate_returns_typed_metrics(images: Path, predictor: Predictor, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("AUTOML_TL_CACHE_DIR", str(tmp_path / "cache"))
    result = predictor.evaluate(str(images))
    assert isinstance(result, Evaluation) and result.split == "all" and result.n == 8
    dataset = load_dataset(str(images), DataConfig(cache_dir=str(tmp_path / "cache")), progress=False)
    labels = match_class_names(predictor.class_names, dataset.class_names, "data")[np.asarray(dataset.labels)]
    probs = predictor.predict_proba([dataset.image(i) for i in range(len(dataset))])
    expected = classification_metrics(labels, probs, predictor.class_names)
    assert result.to_dict() == expected
    assert (result.accuracy, result.log_loss, result.macro_f1) == (
        expected["accuracy"], expected["log_loss"], expected["f1"]["macro"])  # fmt: skip
    best = predictor.evaluate(str(images), member="b")
    assert best.n == 8 and best.log_loss != result.log_loss
    with pytest.raises(DatasetError, match="split must be one of"):
        predictor.evaluate(str(images), "holdout")  # type: ignore[arg-type]
