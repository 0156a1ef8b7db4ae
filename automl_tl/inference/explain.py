"""Where a model looked: Grad-CAM maps (the maintained ``grad-cam`` package) of an artifact's members, and of
its ensemble as the members' maps averaged with the ensemble weights, in the pixel grid of the explained image.

    from automl_tl.inference.explain import Explainer, overlay_png
    explainer = Explainer.load("runs/my_run/artifact")             # mode="ensemble", or mode="best", member=ID
    (found,) = explainer.explain([pixels])                          # -> [Explanation(probabilities, class_index, heatmap)]
    open("where.png", "wb").write(overlay_png(pixels, found.heatmap))

The probabilities are the inference core's (:mod:`automl_tl.inference.core`), the same numbers ``predict``
answers; the map shows the evidence for the top class (or a class asked for). Each member's map is taken
where its network last holds a spatial layout:

* a convolutional network (and any timm model whose features are a feature map, NCHW or NHWC): its two
  coarsest feature stages (timm's ``feature_info``, strides 16 and 32 in most families), weighed by
  LayerCAM, which weighs each position by its own gradient and so keeps the finer stage's detail (a map at
  stride 32 alone is often a cell off a small object); ``forward_features`` where a model lists no stages;
* a ViT (timm vit, deit, eva, siglip, dinov2 ...: a token sequence): the input of the last block's attention
  (``blocks[-1].norm1``), its patch tokens laid back on their grid, the class and register tokens left out.
  The output of the last block would not do: a class-token head reads nothing from the patch tokens there.

Gradients start where the map is taken (the activations before it are computed without a graph), so an
explanation costs a forward, the tail of a backward and the forward that gave the probabilities. Each
member's map covers the centre crop its evaluation transform fed it, mapped back onto the image; elsewhere it
is 0.

    .venv/bin/python -m pytest -q tests/test_explain.py
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automl_tl.backbones import TransferNet
from automl_tl.inference.artifact import Artifact, load_artifact
from automl_tl.inference.calibrate import combine
from automl_tl.inference.core import MemberRunner, Mode, Plan, Preprocessor, plan_for
from automl_tl.inference.transforms import Preprocessing

__all__ = [
    "OVERLAY_MAX_SIDE", "CamTarget", "Explainer", "Explanation", "cam_target", "overlay", "overlay_png", "write_overlays",
]  # fmt: skip

OVERLAY_MAX_SIDE = 512  # maps and overlays are drawn at most this large on the longer side


@dataclasses.dataclass(frozen=True)
class Explanation:
    """One image: its calibrated probabilities, the class explained and where the evidence for it lies."""

    probabilities: np.ndarray  # (C,), as ``predict`` answers them
    class_index: int
    heatmap: np.ndarray  # (h, w) float32 in [0, 1] over the image (shrunk to OVERLAY_MAX_SIDE), 1 at the peak

    def peak(self) -> tuple[int, int]:
        """(row, column) of the strongest evidence, in the heatmap's grid."""
        row, col = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        return int(row), int(col)


@dataclasses.dataclass(frozen=True)
class CamTarget:
    """How Grad-CAM reads one network: the module it calls, the layers whose output it weighs, the module whose
    input gradients start at, and how those outputs become NCHW maps."""

    model: nn.Module
    layers: tuple[nn.Module, ...]
    grad_from: nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor] | None
    method: str = "GradCAM"  # the grad-cam package's class that weighs the layers


class _FeatureMap(nn.Module):
    """A timm network with an identity after ``forward_features``: a layer to hook that every family has."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.net
        out: torch.Tensor = body.forward_head(self.features(body.forward_features(x)))  # type: ignore[operator]
        return out


def cam_target(net: nn.Module) -> CamTarget:
    """Where Grad-CAM reads a timm network (``TransferNet.net``): see the module docstring."""
    blocks = getattr(net, "blocks", None)
    prefix = getattr(net, "num_prefix_tokens", None)
    if prefix is not None and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and hasattr(blocks[-1], "norm1"):
        grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)
        last: nn.Module = blocks[-1]
        return CamTarget(net, (last.get_submodule("norm1"),), last, _token_grid(int(prefix), grid))
    nhwc = getattr(net, "output_fmt", "NCHW") == "NHWC"  # swin and others lay their features out channels-last
    reshape = _channels_first if nhwc else None
    stages = _coarsest_stages(net)
    if stages:
        return CamTarget(net, stages, stages[0], reshape, "LayerCAM")
    wrapped = _FeatureMap(net)
    return CamTarget(wrapped, (wrapped.features,), wrapped.features, reshape)


def _coarsest_stages(net: nn.Module) -> tuple[nn.Module, ...]:
    """The last module of each of the two coarsest reductions timm's ``feature_info`` lists, shallower first;
    none where it lists fewer than two."""
    info = getattr(net, "feature_info", None)
    try:
        entries = [(int(f["reduction"]), str(f["module"])) for f in info] if info else []
    except (KeyError, TypeError, ValueError):
        return ()
    last: dict[int, str] = {}
    for reduction, name in entries:
        last[reduction] = name
    if len(last) < 2:
        return ()
    try:
        return tuple(net.get_submodule(last[r]) for r in sorted(last)[-2:])
    except AttributeError:  # a name timm lists that is not a submodule's path: read forward_features instead
        return ()


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _token_grid(prefix: int, grid: Sequence[int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """(N, prefix + h*w, D) tokens to an (N, D, h, w) map of the patch tokens."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        side = math.isqrt(patches.shape[1])
        h, w = (int(grid[0]), int(grid[1])) if grid else (side, side)
        return patches.reshape(patches.shape[0], h, w, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _start_gradients(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
    """Forward pre-hook: the module's input becomes a leaf that needs a gradient, so a backward stops here."""
    if not torch.is_grad_enabled():
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


def member_cams(model: nn.Module, batch: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM of ``model`` (a built member) for ``classes[j]`` on image j of an NCHW batch: (N, S, S) in [0, 1]."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = model.net if isinstance(model, TransferNet) else model
    target = cam_target(net)
    frozen = [p for p in target.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # no parameter gradients: only those of the activations Grad-CAM weighs
    hook = target.grad_from.register_forward_pre_hook(_start_gradients)
    method = getattr(pytorch_grad_cam, target.method)
    cam = method(model=target.model, target_layers=list(target.layers), reshape_transform=target.reshape)
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:  # not ``with cam``: its __exit__ swallows an IndexError
        cam.activations_and_grads.release()
        hook.remove()
        for p in frozen:
            p.requires_grad_(True)
    return np.asarray(maps, dtype=np.float32)


def crop_box(pre: Preprocessing, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, resized height, resized width) of the centre crop the evaluation transform takes from a
    ``height`` x ``width`` image: torchvision's short-side resize, then its centre-crop rounding."""
    side = pre.resize_side
    short, long = min(height, width), max(height, width)
    if short == side:
        rh, rw = height, width
    else:
        new_long = int(side * long / short)
        rh, rw = (new_long, side) if width <= height else (side, new_long)
    return int(round((rh - pre.input_size) / 2.0)), int(round((rw - pre.input_size) / 2.0)), rh, rw


def _on_image(cam: np.ndarray, pre: Preprocessing, height: int, width: int, out: tuple[int, int]) -> np.ndarray:
    """A member's (S, S) map laid where its crop came from, on an ``out`` (h, w) grid over the whole image."""
    top, left, rh, rw = crop_box(pre, height, width)
    sy, sx = out[0] / rh, out[1] / rw
    y0, y1 = round(top * sy), round((top + pre.input_size) * sy)
    x0, x1 = round(left * sx), round((left + pre.input_size) * sx)
    scaled = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=(max(1, y1 - y0), max(1, x1 - x0)),
                                             mode="bilinear", align_corners=False)[0, 0].numpy()  # fmt: skip
    canvas = np.zeros(out, dtype=np.float32)
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, out[0]), min(x1, out[1])
    canvas[cy0:cy1, cx0:cx1] = scaled[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return canvas


def map_size(height: int, width: int, max_side: int = OVERLAY_MAX_SIDE) -> tuple[int, int]:
    """The (h, w) grid a map of a ``height`` x ``width`` image is drawn on: the image, shrunk to ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class Explainer:
    """A plan's members (see :func:`~automl_tl.inference.core.plan_for`) and their Grad-CAM maps."""

    def __init__(self, artifact: Artifact, plan: Plan, device: str | torch.device = "cpu") -> None:
        self.artifact = artifact
        self.plan = plan
        self._runner = MemberRunner.build(artifact, plan.member_indices, device)
        self._preprocess = Preprocessor(plan.preprocessing)
        self._lock = threading.Lock()  # Grad-CAM hooks the shared models: one batch at a time

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], mode: Mode = "ensemble", member: str | None = None,
        device: str | torch.device = "cpu",
    ) -> Explainer:  # fmt: skip
        """The artifact at ``path``; ``member`` explains one member alone, else ``mode`` chooses as in predict."""
        artifact = load_artifact(path)
        return cls(artifact, plan_for(artifact, mode, member), device)

    def explain(
        self, images: Sequence[np.ndarray], classes: Sequence[int] | None = None, batch_size: int = 16
    ) -> list[Explanation]:
        """One explanation per HWC uint8 RGB image: of ``classes[j]`` for image j, else of its top class."""
        if classes is not None and len(classes) != len(images):
            raise ValueError(f"need one class per image, got {len(classes)} for {len(images)} images")
        out: list[Explanation] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            wanted = None if classes is None else classes[start : start + batch_size]
            with self._lock:
                out.extend(self._explain_batch(chunk, wanted))
        return out

    def _explain_batch(self, images: Sequence[np.ndarray], classes: Sequence[int] | None) -> list[Explanation]:
        batches = self._preprocess.batches(images)
        probs = self.plan.calibrate([self._runner.forward_batch(m, b) for m, b in enumerate(batches)])
        chosen = [int(c) for c in classes] if classes is not None else [int(i) for i in probs.argmax(axis=1)]
        device = self._runner.device
        cams = [member_cams(model, batch.to(device), chosen) for model, batch in zip(self._runner.models, batches)]
        found = []
        for j, image in enumerate(images):
            height, width = image.shape[:2]
            grid = map_size(height, width)
            maps = [_on_image(c[j], pre, height, width, grid) for c, pre in zip(cams, self._preprocess.preprocessing)]
            heat = combine(maps, self.plan.weights).astype(np.float32)
            top = float(heat.max())
            found.append(Explanation(probs[j], chosen[j], heat / top if top > 0 else heat))
        return found


def overlay(image: np.ndarray, heatmap: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The image (HWC uint8 RGB) shrunk to the heatmap's grid, with the heatmap drawn over it in colour."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = heatmap.shape
    base = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BILINEAR))
    drawn: np.ndarray = show_cam_on_image(base.astype(np.float32) / 255.0, heatmap, use_rgb=True,
                                          image_weight=image_weight)  # fmt: skip
    return drawn


def overlay_png(image: np.ndarray, heatmap: np.ndarray, max_side: int | None = None) -> bytes:
    """:func:`overlay` as PNG bytes, at most ``max_side`` on its longer side when given."""
    from PIL import Image

    drawn = Image.fromarray(overlay(image, heatmap))
    if max_side is not None:
        drawn.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_overlays(
    explainer: Explainer, paths: Sequence[Path], out_dir: str | os.PathLike[str], batch_size: int = 16
) -> list[Path]:
    """One overlay PNG per image file in ``out_dir`` (``<stem>.png``; a repeated stem gets ``-2``, ``-3`` ...)."""
    from automl_tl.inference.images import load_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixels = [load_image(p, explainer.artifact.decode_max_side) for p in chunk]
        for path, image, found in zip(chunk, pixels, explainer.explain(pixels, batch_size=batch_size)):
            stem, n = path.stem, 1
            while f"{stem}.png" in taken:
                n += 1
                stem = f"{path.stem}-{n}"
            taken.add(f"{stem}.png")
            target = out / f"{stem}.png"
            target.write_bytes(overlay_png(image, found.heatmap))
            written.append(target)
    return written
