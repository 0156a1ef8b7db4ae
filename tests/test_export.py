"""Exported graphs (ONNX, TorchScript) match the Predictor within 1e-4 on real hymenoptera images."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from automl_tl.inference.artifact import load_artifact
from automl_tl.cli import main
from automl_tl.errors import ArtifactError, ConfigError
from automl_tl.inference.export import METADATA_KEY, export_input, export_model
from automl_tl.inference.predictor import Predictor, load_image
from automl_tl.inference.transforms import Preprocessing, to_tensor_batch

from .test_artifact import CLASSES, make_artifact, make_member

pytestmark = pytest.mark.needs_shared_data
PARITY = 1e-4


@pytest.fixture(scope="module")
def image_paths(hymenoptera_dir: Path) -> list[Path]:
    return [p for name in CLASSES for p in sorted((hymenoptera_dir / "val" / name).glob("*.jpg"))[:3]]


@pytest.fixture(scope="module")
def uniform_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two members sharing one preprocessing (96 px), different heads, unequal weights, a temperature."""
    members = [make_member("a", 96), make_member("b", 96, head="mlp", seed=1, temperature=0.6)]
    return make_artifact(tmp_path_factory.mktemp("uniform") / "artifact", members, weights=[2, 1], temperature=1.7)


def _input(artifact_dir: Path, paths: list[Path], member: str | None = None) -> torch.Tensor:
    pre, _ = export_input(load_artifact(artifact_dir), member=member)
    return to_tensor_batch([load_image(p) for p in paths], pre)


def _load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, object]]:
    files = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), _extra_files=files)
    return module, json.loads(files[f"{METADATA_KEY}.json"])


def test_onnx_ensemble_matches_predictor(uniform_dir: Path, image_paths: list[Path], tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = export_model(uniform_dir, "onnx", tmp_path / "model.onnx")
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY])
    assert meta["class_names"] == list(CLASSES) and meta["exact"] is True and meta["temperature"] == 1.7
    assert Preprocessing.from_dict(meta["input"]["preprocessing"]).input_size == 96
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _input(uniform_dir, image_paths).numpy()
    (got,) = session.run(None, {"input": x})  # batch of 6: the batch dimension is dynamic
    expected = Predictor.load(uniform_dir).predict_proba(image_paths)
    assert got.shape == (6, 2)
    np.testing.assert_allclose(got, expected, atol=PARITY)


def test_torchscript_ensemble_via_cli_matches_predictor(
    uniform_dir: Path, image_paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", str(uniform_dir), "--format", "torchscript", "--out", str(out)]) == 0
    assert "input: float32 (N, 3, 96, 96)" in capsys.readouterr().out
    module, meta = _load_torchscript(out)
    assert meta["members"] == ["a", "b"] and meta["weights"] == pytest.approx([2 / 3, 1 / 3])
    with torch.inference_mode():
        got = module(_input(uniform_dir, image_paths)).numpy()
    np.testing.assert_allclose(got, Predictor.load(uniform_dir).predict_proba(image_paths), atol=PARITY)


def test_torchscript_member_matches_predictor_member(
    uniform_dir: Path, image_paths: list[Path], tmp_path: Path
) -> None:
    out = export_model(uniform_dir, "torchscript", tmp_path / "b.pt", member="b")
    module, meta = _load_torchscript(out)
    assert meta["members"] == ["b"] and meta["temperature"] == 0.6
    with torch.inference_mode():
        got = module(_input(uniform_dir, image_paths, member="b")).numpy()
    expected = Predictor.load(uniform_dir).predict_proba(image_paths, member="b")
    np.testing.assert_allclose(got, expected, atol=PARITY)


def test_mixed_input_sizes_adapt_inside_the_graph(image_paths: list[Path], tmp_path: Path) -> None:
    members = [make_member("small", 96), make_member("large", 128, seed=3)]
    art = make_artifact(tmp_path / "artifact", members)
    pre, exact = export_input(load_artifact(art))
    assert pre.input_size == 128 and not exact  # the largest member's input; the other is adapted
    out = export_model(art, "torchscript", tmp_path / "mixed.pt")  # export_model checks file vs eager graph
    module, meta = _load_torchscript(out)
    assert meta["exact"] is False and meta["input"]["preprocessing"]["input_size"] == 128
    with torch.inference_mode():
        got = module(_input(art, image_paths)).numpy()
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # close to, not identical with, preprocessing each image for each member
    assert np.abs(got - Predictor.load(art).predict_proba(image_paths)).max() < 0.1


def test_bad_requests(uniform_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="export format must be one of onnx, torchscript"):
        export_model(uniform_dir, "tflite", tmp_path / "m")  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="no member 'zzz'; members: a, b"):
        export_model(uniform_dir, "torchscript", tmp_path / "m.pt", member="zzz")
