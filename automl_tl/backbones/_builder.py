"""Building a pretrained backbone as a torch module, with a new head and a freeze depth.

Weights are resolved before anything is built so that a missing source fails fast, naming the backbone
and every source tried, long before a sweep starts training.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from automl_tl.backbones._hub import HUB_TIMEOUT_S, check_weights, download_hub_file, hub_source, hub_weights_file
from automl_tl.backbones._hub import local_weights_file
from automl_tl.backbones._registry import (
    BackboneSpec,
    FetchedFile,
    LocalFile,
    PackagedFile,
    TimmHub,
    WeightSource,
    get_backbone_spec,
)
from automl_tl.backbones._reach import HUB_PREFIX, weights_dir
from automl_tl.backbones._weights import load_source_state_dict
from automl_tl.errors import BackboneError



class TransferNet(nn.Module):
    """A timm network plus what transfer learning needs: its spec, freeze depth, frozen parts and head.

    ``train()`` keeps frozen modules (their BatchNorm statistics in particular) in eval mode, so a frozen
    stage behaves exactly like the pretrained one while the rest of the network trains.
    """

    def __init__(self, net: nn.Module, spec: BackboneSpec, freeze_depth: int, frozen: list[str]) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.freeze_depth = freeze_depth
        modules = dict(net.named_modules())
        self.frozen_modules = tuple(name for name in frozen if name in modules)  # tokens are parameters
        self.head_name = _classifier_path(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of width ``spec.feature_width``: what the head sees."""
        body: Any = self.net  # a timm model: forward_features/forward_head are its own API
        pooled: torch.Tensor = body.forward_head(body.forward_features(x), pre_logits=True)
        return pooled

    @property
    def head(self) -> nn.Module:
        """The classifier: the only part no freeze depth freezes."""
        return self.net.get_submodule(self.head_name)

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if mode:
            for name in self.frozen_modules:
                self.net.get_submodule(name).eval()
        return self

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_layers(self) -> list[list[nn.Parameter]]:
        """The trainable parameters outside the head by depth: [stem, stage 1, ..., stage n] (some empty).

        Layer-wise learning-rate decay gives each its own rate, smaller the nearer the input."""
        layers: list[list[nn.Parameter]] = [[] for _ in range(self.spec.max_freeze_depth + 1)]
        head = self.head_name + "."
        for name, param in self.net.named_parameters():
            if param.requires_grad and not name.startswith(head):
                layers[layer_index(self.spec, name)].append(param)
        return layers


def _covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_index(spec: BackboneSpec, param_name: str) -> int:
    """0 for a parameter of the stem, ``i`` for one of stage ``i`` (1-based); the last stage for any other
    (the one rule freezing and layer-wise decay share)."""
    if any(_covers(p, param_name) for p in spec.stem):
        return 0
    for index, stage in enumerate(spec.stages, start=1):
        if any(_covers(p, param_name) for p in stage):
            return index
    return len(spec.stages)


def frozen_names(spec: BackboneSpec, freeze_depth: int) -> list[str]:
    """The names ``freeze_depth`` freezes: none at 0, else the stem and the first ``freeze_depth`` stages."""
    if not freeze_depth:
        return []
    return list(spec.stem) + [name for stage in spec.stages[:freeze_depth] for name in stage]


def memory_format_for(device: torch.device) -> torch.memory_format:
    """Channels-last, on CPU as on GPU: depthwise-separable networks train and answer faster in it on CPU,
    with outputs equal to 1e-6."""
    return torch.channels_last


def resolve_spec(name: str) -> BackboneSpec:
    """A registered spec, or for ``timm:<architecture>[.<tag>]`` a spec read from timm's own model and
    pretrained config (made once per name and weights folder in a process)."""
    if not name.startswith(HUB_PREFIX):
        return get_backbone_spec(name)
    return _hub_spec(name, str(weights_dir()))


@functools.lru_cache(maxsize=64)
def _hub_spec(name: str, weights_folder: str) -> BackboneSpec:
    arch = name[len(HUB_PREFIX) :]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
        raise BackboneError(f"backbone '{name}': timm has no architecture '{arch.split('.')[0]}'{hint}")
    try:
        with torch.device("meta"):  # the layout and config only: no memory, no initialisation
            net: Any = timm.create_model(arch, pretrained=False)
    except Exception as exc:  # timm raises RuntimeError for a tag it does not know, and more
        raise BackboneError(f"backbone '{name}': timm cannot build '{arch}': {str(exc).splitlines()[0]}") from None
    cfg = net.pretrained_cfg
    stem, *stages = parameter_groups(net)
    return BackboneSpec(
        name=name,
        architecture=arch,
        weights=_weights_source(arch, cfg),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        feature_width=int(getattr(net, "head_hidden_size", None) or net.num_features),  # after any conv head
        stem=stem,
        stages=tuple(stages),
        pretrained_classes=int(cfg.get("num_classes") or 0) or None,
        sized_at_build="img_size" in inspect.signature(type(net).__init__).parameters,
    )


def _weights_source(arch: str, cfg: dict[str, Any]) -> WeightSource:
    """Where the weights of timm's ``arch`` (pretrained config ``cfg``) come from: a file in the weights
    folder, else timm's own hub source."""
    full = f"{cfg.get('architecture')}.{cfg.get('tag')}" if cfg.get("tag") else arch
    local = local_weights_file([arch, full])
    hub = hub_source(cfg)
    return LocalFile(str(local), license=hub.license) if local is not None else hub


def timm_weights_source(name: str) -> WeightSource:
    """The weight source of ``timm:<architecture>[.<tag>]`` read from timm's pretrained config alone, without
    building the network (what a preset asks of many backbones at once)."""
    from timm.models import get_pretrained_cfg

    arch = name.removeprefix(HUB_PREFIX)
    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        raise BackboneError(f"backbone '{name}': timm has no pretrained weights for '{arch}'")
    return _weights_source(arch, cfg.to_dict())


def parameter_groups(net: Any) -> list[tuple[str, ...]]:
    """timm's coarse layer groups of ``net`` in order (stem first), the classifier left out, each as the
    fewest names that cover its parameters: class, position and register tokens sit in the stem, final
    norms and convolutional heads in the last group."""
    from timm.models import group_parameters

    head = {id(p) for p in _classifier(net).parameters()}
    params = dict(net.named_parameters())
    by_group = group_parameters(net, net.group_matcher(coarse=True))
    group_of = {n: -1 if id(params[n]) in head else gid for gid, names in by_group.items() for n in names}
    groups_under: dict[str, set[int]] = {}  # every dotted prefix: the groups of the parameters under it
    for pname, gid in group_of.items():
        parts = pname.split(".")
        for i in range(1, len(parts) + 1):
            groups_under.setdefault(".".join(parts[:i]), set()).add(gid)
    covering: dict[int, list[str]] = {}
    for pname, gid in group_of.items():
        if gid < 0:
            continue
        parts = pname.split(".")
        prefix = next(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if groups_under[p] == {gid})
        if prefix not in covering.setdefault(gid, []):
            covering[gid].append(prefix)
    groups = [tuple(covering[gid]) for gid in sorted(covering)]
    if len(groups) < 2:
        raise BackboneError(f"{type(net).__name__}: timm's layer groups give no stage below the stem to freeze by")
    return groups


def _classifier(net: Any) -> nn.Module:
    head = net.get_classifier()
    if not isinstance(head, nn.Module):  # distilled models have two heads
        raise BackboneError(f"{type(net).__name__}: a classifier of {len(head)} heads is not supported")
    return head  # type: ignore[no-any-return]


def _classifier_path(net: Any) -> str:
    """The dotted name of the classifier, however deep timm nests it (``fc``, ``head``, ``head.fc``)."""
    head = _classifier(net)
    return next(name for name, module in net.named_modules() if module is head)


def create_backbone(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = True,
    freeze_depth: int = 0,
    weights_file: str | os.PathLike[str] | None = None,
    head: str = "linear",
    head_dropout: float = 0.0,
    image_size: int | None = None,
) -> TransferNet:
    """Build backbone ``name`` with pretrained weights, an optional new head and a freeze depth.

    ``num_classes=None`` keeps the pretrained classifier where the weights have one (the ImageNet head of
    the EfficientNet-Lite models); a backbone without one then returns pooled features. ``freeze_depth=k``
    freezes the stem and the first ``k`` stages; ``spec.max_freeze_depth`` freezes the whole feature
    extractor. ``weights_file`` (safetensors or state dict in timm's layout) replaces the spec's source.
    A new head is ``"linear"`` (dropout, then one linear layer) or ``"mlp"`` (linear to
    ``MLP_HIDDEN``, GELU, dropout, linear): the two heads the sweep chooses between. ``image_size`` is the
    input side the network will see: a network timm builds for one size (a ViT) is built for it.

    >>> net = create_backbone("tf_efficientnet_lite0", num_classes=3, freeze_depth=2)
    >>> net(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 3])
    """
    spec = resolve_spec(name)
    if isinstance(freeze_depth, bool) or not isinstance(freeze_depth, int):
        raise BackboneError(f"freeze_depth must be an integer, got {freeze_depth!r}")
    if not 0 <= freeze_depth <= spec.max_freeze_depth:
        raise BackboneError(
            f"backbone '{name}': freeze_depth must be between 0 and {spec.max_freeze_depth} "
            f"(stem + {spec.max_freeze_depth} stages), got {freeze_depth}"
        )
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise BackboneError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    if image_size is not None and (isinstance(image_size, bool) or image_size < 8):
        raise BackboneError(f"backbone '{name}': image_size must be an integer >= 8, got {image_size!r}")
    source: WeightSource = LocalFile(os.fspath(weights_file)) if weights_file is not None else spec.weights
    keep_head = num_classes is None and spec.pretrained_classes is not None and pretrained
    kwargs: dict[str, Any] = dict(spec.timm_kwargs)
    if spec.sized_at_build and image_size is not None:
        kwargs["img_size"] = image_size
    net: Any
    if not pretrained:
        net = timm.create_model(spec.architecture, pretrained=False, num_classes=spec.pretrained_classes or 0, **kwargs)
    elif isinstance(source, (PackagedFile, FetchedFile)):
        net = timm.create_model(spec.architecture, pretrained=False, num_classes=spec.pretrained_classes or 0, **kwargs)
        _load_converted(net, spec, source)
    else:
        net = _create_with_weights(spec, source, kwargs)
    if num_classes is not None:
        net.reset_classifier(num_classes)
        new_head = make_head(head, spec.feature_width, num_classes, head_dropout)
        if isinstance(_classifier(net), nn.Conv2d):  # a 1x1 convolution on pooled maps (ResNetV2): flatten them
            new_head = nn.Sequential(nn.Flatten(1), new_head)
        _set_module(net, _classifier_path(net), new_head)
    elif not keep_head:
        net.reset_classifier(0)  # pooled features out
    return freeze(net, spec, freeze_depth)


def freeze(net: nn.Module, spec: BackboneSpec, freeze_depth: int) -> TransferNet:
    """``net`` of backbone ``spec``, its head in place, with the stem and the first ``freeze_depth`` stages
    frozen (every parameter they cover, tokens included); other parameters are left as they are."""
    net.eval()
    frozen = frozen_names(spec, freeze_depth)
    for pname, param in net.named_parameters():
        if any(_covers(f, pname) for f in frozen):
            param.requires_grad_(False)
    model = TransferNet(net, spec, freeze_depth, frozen)
    model.eval()
    return model


MLP_HIDDEN = 512


def _set_module(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def make_head(kind: str, in_features: int, num_classes: int, dropout: float) -> nn.Module:
    """A fresh classification head for pooled features of width ``in_features``."""
    if not 0.0 <= dropout < 1.0:
        raise BackboneError(f"head dropout must lie in [0, 1), got {dropout}")
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, MLP_HIDDEN), nn.GELU(), nn.Dropout(dropout), nn.Linear(MLP_HIDDEN, num_classes)
        )
    raise BackboneError(f"head must be 'linear' or 'mlp', got {kind!r}")


def _weights_path(spec: BackboneSpec, source: LocalFile | TimmHub) -> Path:
    """The file to read: the local one, or the hub's from the cache (fetched into it when absent)."""
    if isinstance(source, LocalFile):
        return Path(source.path).expanduser()
    cached = hub_weights_file(source)
    if cached is not None:
        return cached
    try:
        return download_hub_file(source)
    except Exception as exc:  # hub, network and cache errors come in many types
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise BackboneError(
            f"backbone '{spec.name}': no pretrained weights found{offline}; tried: {source.describe()}, "
            f"{LocalFile(str(weights_dir() / (spec.architecture + '.safetensors'))).describe()}. "
            f"Last error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _create_with_weights(spec: BackboneSpec, source: LocalFile | TimmHub, kwargs: dict[str, Any]) -> nn.Module:
    """Build through timm's own loading path, fed a state dict in its key layout: timm's per-family filter
    resamples position embeddings and attention tables to the size built, as for hub weights."""
    path = _weights_path(spec, source)
    try:
        state = load_source_state_dict(LocalFile(str(path)))
    except BackboneError as exc:
        raise BackboneError(f"backbone '{spec.name}': no pretrained weights; tried {source.describe()}: {exc}") from None
    from timm.models import get_pretrained_cfg

    named = get_pretrained_cfg(spec.architecture)
    heads = tuple(f"{h}." for h in _as_tuple(named.classifier if named is not None else None))
    classes = spec.pretrained_classes if any(k.startswith(heads) for k in state) else 0
    if heads and not classes:
        state = {k: v for k, v in state.items() if not k.startswith(heads)}  # a head this spec does not keep
    # The overlay's class count matches the built one, so timm loads strictly: a file that does not fit fails.
    overlay = {"state_dict": state, "num_classes": classes or 0, "custom_load": False, "source": None, "file": None}
    try:
        net: Any = timm.create_model(
            spec.architecture, pretrained=True, num_classes=classes or 0, pretrained_cfg_overlay=overlay, **kwargs
        )
    except RuntimeError as exc:
        raise BackboneError(
            f"backbone '{spec.name}': weights from {source.describe()} do not fit {spec.architecture}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    net.pretrained_cfg = {k: v for k, v in net.pretrained_cfg.items() if k != "state_dict"}  # do not keep a copy
    return net  # type: ignore[no-any-return]


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _load_converted(net: Any, spec: BackboneSpec, source: PackagedFile | FetchedFile) -> None:
    try:
        state = load_source_state_dict(source)
    except BackboneError as exc:
        raise BackboneError(f"backbone '{spec.name}': no pretrained weights; tried {source.describe()}: {exc}") from None
    if not spec.pretrained_classes:
        head = _classifier_path(net) + "."
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(
            f"backbone '{spec.name}': weights from {source.describe()} do not fit {spec.architecture}: "
            f"{str(exc).splitlines()[0]}"
        ) from None


def check_backbones(names: Sequence[str], timeout_s: float = HUB_TIMEOUT_S) -> list[BackboneSpec]:
    """Pre-flight: resolve every backbone of ``names`` and check its weights can be had, all at once and
    within ``timeout_s`` (plus a margin) for the hub, before any data is read or Ray starts."""
    specs = [resolve_spec(name) for name in names]
    check_weights(specs, timeout_s)
    return specs
