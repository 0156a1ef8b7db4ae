"""Exported graphs (ONNX, TorchScript) match the Predictor within 1e-4 on real hymenoptera images."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from automl_tl.inference.artifact import load_artifact, write_artifact
from automl_tl.cli import main
from automl_tl.errors import ArtifactError, ConfigError
from automl_tl.inference.export import METADATA_KEY, export_input, export_model
from automl_tl.inference.predictor import Predictor, load_image
from automl_tl.inference.transforms import Preprocessing, to_tensor_batch

from .test_artifact import CLASSES, make_artifact, make_member, unbuildable_member

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


def _input(artifact_dir: Path, paths: list[Path], member: str | None = None, mode: str = "ensemble") -> torch.Tensor:
    pre, _ = export_input(load_artifact(artifact_dir), mode=mode, member=member)  # type: ignore[arg-type]
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


@pytest.fixture(scope="module")
def best_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two members of weight 2 and 1 and the best single trial "c" at weight 0, sharing one preprocessing."""
    members = [make_member("a", 96), make_member("b", 96, head="mlp", seed=1, temperature=0.6),
               make_member("c", 96, seed=2, temperature=0.8)]  # fmt: skip
    out = tmp_path_factory.mktemp("best") / "artifact"
    write_artifact(out, CLASSES, members, [2.0, 1.0, 0.0], 1.7, metrics={"best_member": "c"})
    return out


def test_export_takes_the_mode(best_dir: Path, image_paths: list[Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "best.pt"
    assert main(["export", str(best_dir), "--format", "torchscript", "--out", str(out), "--mode", "best"]) == 0
    assert "exported the best member" in capsys.readouterr().out
    module, meta = _load_torchscript(out)
    assert meta["mode"] == "best" and meta["members"] == ["c"] and meta["temperature"] == 0.8
    with torch.inference_mode():
        got = module(_input(best_dir, image_paths, mode="best")).numpy()
    np.testing.assert_allclose(got, Predictor.load(best_dir, mode="best").predict_proba(image_paths), atol=PARITY)
    _, meta = _load_torchscript(export_model(best_dir, "torchscript", tmp_path / "e.pt", mode="ensemble"))
    assert meta["mode"] == "ensemble" and meta["members"] == ["a", "b"]  # the weight-0 best trial is left out
    with pytest.raises(ConfigError, match="mode must be one of best, ensemble"):
        export_model(best_dir, "torchscript", tmp_path / "m.pt", mode="top")  # type: ignore[arg-type]


def test_an_ensemble_export_never_builds_a_weight_0_member(tmp_path: Path) -> None:
    members = [make_member("a", 96), unbuildable_member("z", 96)]
    art = make_artifact(tmp_path / "artifact", members, weights=[1.0, 0.0])
    _, meta = _load_torchscript(export_model(art, "torchscript", tmp_path / "e.pt"))
    assert meta["members"] == ["a"] and meta["weights"] == [1.0]
    with pytest.raises(ArtifactError, match="weights do not fit"):
        export_model(art, "torchscript", tmp_path / "z.pt", member="z")


@pytest.mark.parametrize("mode", ["best", "ensemble"])
def test_predictor_export_graph_and_served_model_agree(
    mode: str, best_dir: Path, image_paths: list[Path], tmp_path: Path
) -> None:
    """The same members, the same inputs, the same arithmetic: a Predictor, the exported graph and a Serve
    replica's forward (decode, preprocess, its lanes, calibrate; no Ray needed) answer alike."""
    import asyncio

    from automl_tl.serve._args import AppArgs
    from automl_tl.serve._inputs import RawImage, decode_image
    from automl_tl.serve._model import Preprocessor, plan_for
    from automl_tl.serve._replica import Forward

    predictor = Predictor.load(best_dir, mode=mode)  # type: ignore[arg-type]
    expected = predictor.predict_proba(image_paths)
    module, meta = _load_torchscript(export_model(best_dir, "torchscript", tmp_path / "m.pt", mode=mode))  # type: ignore[arg-type]
    with torch.inference_mode():
        exported = module(_input(best_dir, image_paths, mode=mode)).numpy()

    artifact = load_artifact(best_dir)
    plan = plan_for(artifact, mode)
    forward = Forward.serving(artifact, plan.member_indices, AppArgs(artifact=str(best_dir), mode=mode))
    prep = Preprocessor(plan.preprocessing)

    def prepare() -> list[tuple[torch.Tensor, ...]]:
        raw = [RawImage(p.name, p.read_bytes()) for p in image_paths]
        return [prep(decode_image(r, artifact.decode_max_side, 10**8)) for r in raw]

    before = torch.get_num_threads()
    try:
        rows = asyncio.run(forward.solo(prepare))
    finally:
        torch.set_num_threads(before)
    served = np.concatenate([plan.calibrate([p[None, :] for p in member_rows]) for member_rows, _, _ in rows])

    assert list(predictor.plan.member_ids) == meta["members"] == list(plan.member_ids)
    assert ("c" in meta["members"]) is (mode == "best")
    np.testing.assert_allclose(served, expected, atol=1e-5)  # a replica forwards on its own thread count
    np.testing.assert_allclose(exported, expected, atol=PARITY)
