"""A built member made ready to answer: eval mode, batch norms folded into their convolutions, on its device.

In eval mode a batch norm that follows a convolution is an affine map per output channel, so it can be
folded into the convolution's weight and bias, and the network reads and writes each activation once less,
with class probabilities equal to the unfolded network's to float precision.

Which convolution feeds which batch norm is read from one traced forward, not from module names, so it holds
for any timm architecture. A folded copy is kept only if it answers as the original does on a random input;
anything folding cannot express (a convolution that standardises its weight, an output used twice) is
served unfolded.
"""

from __future__ import annotations

import copy
import os

import torch
from timm.layers import BatchNormAct2d

from automl_tl.backbones._builder import memory_format_for

__all__ = ["AB_OFF_ENV", "ab_off", "fold_batch_norms", "ready_for_inference"]

# Private, for ``benchmarks/bench_serve.py --ab`` alone: the speed mechanisms named here (comma-separated) run
# as if they were absent, so the benchmark can time the serving code with and without each in the same run.
AB_OFF_ENV = "AUTOML_TL_AB_OFF"


def ab_off(mechanism: str) -> bool:
    """Whether this process runs without ``mechanism`` (see :data:`AB_OFF_ENV`)."""
    return mechanism in os.environ.get(AB_OFF_ENV, "").split(",")


_PROBE_SIDE = 64  # pixels of the random image that traces and checks the fold: any CNN takes it, quickly


def ready_for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in eval mode, with its batch norms folded when that is exact, on ``device`` in the memory
    layout that is fastest there."""
    folded = model.eval() if ab_off("batch_norm_folding") else fold_batch_norms(model.eval())
    return folded.to(device).to(memory_format=memory_format_for(device)).eval()


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of eval-mode ``model`` with every batch norm that directly follows a convolution folded into it,
    or ``model`` itself when there is none or the folded copy does not answer as ``model`` does."""
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    where = next((p.device for p in model.parameters()), torch.device("cpu"))
    probe = torch.randn(2, 3, _PROBE_SIDE, _PROBE_SIDE, generator=torch.Generator().manual_seed(0)).to(where)
    try:
        folded = copy.deepcopy(model)
        pairs, expected = _conv_then_norm(folded, probe)  # the copy still answers as ``model`` does
        if not pairs:
            return model
        for conv, norm in pairs:
            _fold(conv, norm)
        _drop_norms(folded, {id(norm) for _, norm in pairs})
        with torch.inference_mode():
            got = folded(probe)
    except Exception:  # noqa: BLE001 - a network the probe cannot trace is served as it is
        return model
    if not isinstance(got, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return model
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
        return model
    return folded


def _conv_then_norm(
    model: torch.nn.Module, probe: torch.Tensor
) -> tuple[list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]], object]:
    """(convolution, batch norm) pairs where the norm's input is the very tensor the convolution returned,
    and the model's output for ``probe``."""
    produced: dict[int, torch.nn.Conv2d] = {}
    pairs: list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]] = []

    def seen(module: torch.nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if isinstance(module, torch.nn.Conv2d):
            produced[id(output)] = module
        elif inputs and id(inputs[0]) in produced and _foldable_norm(module):
            pairs.append((produced[id(inputs[0])], module))  # type: ignore[arg-type]

    hooks = [
        m.register_forward_hook(seen)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) or _foldable_norm(m)
    ]
    try:
        with torch.inference_mode():
            output = model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    # A convolution that feeds two norms, or a norm fed twice, is left alone.
    convs = [id(c) for c, _ in pairs]
    norms = [id(n) for _, n in pairs]
    return [(c, n) for c, n in pairs if convs.count(id(c)) == 1 and norms.count(id(n)) == 1], output


def _foldable_norm(module: torch.nn.Module) -> bool:
    """A plain batch norm, or timm's batch norm followed by dropout and an activation, that uses running
    statistics."""
    return type(module) in (torch.nn.BatchNorm2d, BatchNormAct2d) and bool(module.track_running_stats)


@torch.no_grad()
def _fold(conv: torch.nn.Conv2d, norm: torch.nn.BatchNorm2d) -> None:
    assert norm.running_var is not None and norm.running_mean is not None  # track_running_stats
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.affine:
        shift = shift + norm.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = torch.nn.Parameter(bias * scale + shift)


def _drop_norms(model: torch.nn.Module, folded: set[int]) -> None:
    """Replace each folded norm by what it did after normalising: nothing, or timm's dropout + activation."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in folded:
                after = torch.nn.Sequential(child.drop, child.act) if isinstance(child, BatchNormAct2d) else None
                setattr(parent, name, after if after is not None else torch.nn.Identity())
