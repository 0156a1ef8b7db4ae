"""Export an artifact, one member or the whole ensemble, as a single ONNX or TorchScript graph.

    automl-tl export runs/my_run/artifact --format onnx --out model.onnx [--mode best|ensemble] [--member ID]

The members are the inference core's plan (:func:`~automl_tl.inference.core.plan_for`), chosen as the
Predictor and serving choose them: ``--mode ensemble`` (the default) every member of non-zero weight,
``--mode best`` the best single member, ``--member`` one named member. The graph takes ONE preprocessed
tensor, float32 (N, 3, S, S), normalised as the ``input`` entry of the embedded metadata says (the
preprocessing of the member with the largest input size, the first on ties), and returns calibrated
probabilities (N, C) in ``class_names`` order: the member softmaxes averaged with the plan's weights, then
``softmax(log(p) / T)``. Members whose preprocessing differs from the input's get
an adapter inside the graph: undo the input normalisation, centre-crop to the member's field of view,
resize (antialiased, the member's interpolation) to its size and normalise with its mean and std. That is
close to, not identical with, preprocessing the image for that member, so the metadata says ``"exact":
false``; with one shared preprocessing (or one member) the graph matches the Predictor to float precision.

Metadata (class names, input preprocessing, mode, members, weights, temperature) travels inside the file: the
ONNX model's ``metadata_props["automl_tl"]`` or the TorchScript archive's extra file ``automl_tl.json``.
ONNX export needs ``onnx`` and ``onnxscript`` (checked with ``onnxruntime`` when installed).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from automl_tl.errors import AutoMLError, ConfigError
from automl_tl.evaluate.metrics import PROB_EPS
from automl_tl.inference.artifact import FORMAT_VERSION, Artifact, load_artifact
from automl_tl.inference.core import Mode, plan_for
from automl_tl.inference.transforms import Preprocessing

__all__ = [
    "EXPORT_FORMATS",
    "METADATA_KEY",
    "ExportFormat",
    "ExportGraph",
    "InputAdapter",
    "build_export_graph",
    "export_input",
    "export_model",
]

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
METADATA_KEY = "automl_tl"
_PARITY_TOLERANCE = 1e-4


class InputAdapter(nn.Module):
    """Turns a tensor preprocessed with ``source`` into (nearly) one preprocessed with ``target``."""

    src_mean: torch.Tensor
    src_std: torch.Tensor
    dst_mean: torch.Tensor
    dst_std: torch.Tensor

    def __init__(self, source: Preprocessing, target: Preprocessing) -> None:
        super().__init__()
        self.register_buffer("src_mean", torch.tensor(source.mean).view(1, 3, 1, 1))
        self.register_buffer("src_std", torch.tensor(source.std).view(1, 3, 1, 1))
        self.register_buffer("dst_mean", torch.tensor(target.mean).view(1, 3, 1, 1))
        self.register_buffer("dst_std", torch.tensor(target.std).view(1, 3, 1, 1))
        # Each preprocessing sees the central (input_size / resize_side) of the image's short side.
        seen_src = source.input_size / source.resize_side
        seen_dst = target.input_size / target.resize_side
        side = round(source.input_size * min(1.0, seen_dst / seen_src))
        self.crop_start = (source.input_size - side) // 2
        self.crop_side = side
        self.size = target.input_size
        self.mode = target.interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.src_std + self.src_mean
        end = self.crop_start + self.crop_side
        pixels = pixels[:, :, self.crop_start : end, self.crop_start : end]
        if self.crop_side != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode=self.mode, antialias=True)
        return (pixels.clamp(0.0, 1.0) - self.dst_mean) / self.dst_std


class ExportGraph(nn.Module):
    """Preprocessed tensor in, calibrated probabilities out: the Predictor's arithmetic as one module."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        weights: Sequence[float],
        temperature: float,
        adapters: Sequence[nn.Module | None],
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.adapters = nn.ModuleList([a if a is not None else nn.Identity() for a in adapters])
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.inv_temperature = 1.0 / float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.zeros(())
        for weight, adapter, model in zip(self.weights, self.adapters, self.members):
            probs = probs + weight * torch.softmax(model(adapter(x)), dim=1)
        return torch.softmax(torch.log(probs.clamp_min(PROB_EPS)) * self.inv_temperature, dim=1)


def export_input(artifact: Artifact, *, mode: Mode = "ensemble", member: str | None = None) -> tuple[Preprocessing, bool]:
    """The preprocessing the exported graph's input expects, and whether the graph is then exact."""
    pres = plan_for(artifact, mode, member).preprocessing
    reference = max(pres, key=lambda p: p.input_size)  # max() keeps the first of equal sizes
    return reference, all(pre == reference for pre in pres)


def build_export_graph(
    artifact: Artifact, *, mode: Mode = "ensemble", member: str | None = None
) -> tuple[ExportGraph, Preprocessing, dict[str, Any]]:
    """The graph of the plan ``mode`` (or ``member``) names, the preprocessing its input expects, and its
    metadata."""
    plan = plan_for(artifact, mode, member)
    if plan.threshold is not None:
        raise ConfigError("mode 'cascade' cannot be exported: one graph runs every member on every row; export "
                          "the ensemble (--mode ensemble) and the cheap member (--member ID) instead")  # fmt: skip
    reference, _ = export_input(artifact, mode=mode, member=member)
    adapters = [None if pre == reference else InputAdapter(reference, pre) for pre in plan.preprocessing]
    models = [artifact.build_model(i) for i in plan.member_indices]
    graph = ExportGraph(models, plan.weights, plan.temperature, adapters).eval()
    metadata = {
        "format_version": FORMAT_VERSION,
        "class_names": list(artifact.class_names),
        "input": {
            "layout": "NCHW float32, RGB",
            "preprocessing": reference.to_dict(),
            "decode_max_side": artifact.decode_max_side,
        },
        "output": "calibrated probabilities (N, C) in class_names order",
        "mode": plan.mode,
        "members": list(plan.member_ids),
        "weights": graph.weights,
        "temperature": plan.temperature,
        "exact": all(a is None for a in adapters),
        "artifact_versions": dict(artifact.versions),
    }
    return graph, reference, metadata


def export_model(
    artifact_path: str | os.PathLike[str],
    fmt: ExportFormat,
    out: Path,
    *,
    mode: Mode = "ensemble",
    member: str | None = None,
) -> Path:
    """Export the plan ``mode`` names (or ``member`` alone) of the artifact at ``artifact_path`` to ``out``;
    return ``out``.

    The exported file is checked against the eager graph on a random batch before this returns.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    artifact = load_artifact(artifact_path)
    graph, pre, metadata = build_export_graph(artifact, mode=mode, member=member)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, pre.input_size, pre.input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = graph(example)
    if fmt == "onnx":
        _export_onnx(graph, example, out, metadata)
        got = _run_onnx(out, example)
    else:
        _export_torchscript(graph, example, out, metadata)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            got = torch.jit.load(str(out), map_location="cpu")(example)
    # Runtimes implement antialiased resizing slightly differently, so adapted graphs get a looser check.
    tolerance = _PARITY_TOLERANCE if metadata["exact"] else 10 * _PARITY_TOLERANCE
    if got is not None and not torch.allclose(got, expected, atol=tolerance, rtol=0):
        diff = float((got - expected).abs().max())
        raise AutoMLError(f"{out}: the exported {fmt} graph differs from the model by {diff:.2e} (> {tolerance:g})")
    return out


def _export_torchscript(graph: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit is deprecated, still supported
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # shape arithmetic frozen: fixed input
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def _export_onnx(graph: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, Any]) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as exc:
        raise AutoMLError(f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): "
                          "pip install onnx onnxscript") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(out),
            dynamo=True,
            external_data=False,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(metadata)
    onnx.save(model, str(out))


def _run_onnx(path: Path, example: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime
    except ImportError:
        return None  # the check is skipped; the file is still a valid export
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"input": example.numpy()})
    return torch.from_numpy(probs)
