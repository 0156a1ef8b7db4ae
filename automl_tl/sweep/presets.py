"""Presets: ``fast``, ``balanced`` and ``best`` (AutoGluon's names), a sweep sized to the machine at hand.

A preset fills the fields of the space, the search and the resources that the user left unset: backbones,
image sizes, batch sizes, epochs, trial count and time budget, and how many trials run side by side on which
devices. It reads two kinds of fact, both in one :class:`Hardware` value so that a test can ask what ``best``
would pick on four large GPUs without having them: the devices (CPUs; GPUs and their memory, from torch.cuda)
and which pretrained weights are reachable (the hub pre-flight of :mod:`automl_tl.backbones`). Offline, the
registered backbones (their weights ship with the project); with the hub, a curated list of current strong
transfer backbones under permissive licenses, each one a family that ``tests/test_backbone_families.py``
runs end to end.

    automl-tl backbones --preset best        # what best would search on this machine, and why
    automl-tl search --data DIR --out runs/x --preset balanced
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Literal, cast

from automl_tl.config import PRESETS, ExperimentConfig, Preset, load_config
from automl_tl.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "CURATED",
    "Preset",
    "Hardware",
    "CuratedBackbone",
    "Choice",
    "choose",
    "apply_preset",
    "detect_hardware",
    "explain",
    "resolve_preset",
]

Tier = Literal["compact", "base", "large"]
Machine = Literal["cpu", "small_gpu", "gpu", "large_gpu"]

SMALL_GPU_GIB = 16.0  # GPUs with less memory than this (each) fine-tune base-size networks at a squeeze
LARGE_GPU_GIB = 40.0  # GPUs with at least this much memory (each) hold the large tier at its native size


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What a preset reads from the machine: its devices and which weights it can reach."""

    cpus: int
    gpu_memory_gib: tuple[float, ...] = ()  # one entry per visible GPU
    hub: bool = False  # the Hugging Face hub answers
    local_weights: frozenset[str] = frozenset()  # curated backbones whose weights are on this machine already
    hub_note: str = ""  # why the hub does not answer, when it does not

    @property
    def gpus(self) -> int:
        return len(self.gpu_memory_gib)

    @property
    def machine(self) -> Machine:
        """The class of machine the tables below are keyed by; a mix of GPUs counts as its smallest."""
        if not self.gpus:
            return "cpu"
        smallest = min(self.gpu_memory_gib)
        return "small_gpu" if smallest < SMALL_GPU_GIB else "large_gpu" if smallest >= LARGE_GPU_GIB else "gpu"

    def describe(self) -> str:
        if not self.gpus:
            devices = f"{self.cpus} CPUs, no GPU"
        else:
            devices = f"{self.gpus} GPU(s) of {min(self.gpu_memory_gib):.0f} GiB, {self.cpus} CPUs"
        hub = "the hub answers" if self.hub else f"the hub is unreachable ({self.hub_note or 'not asked'})"
        local = f", {len(self.local_weights)} curated backbone(s) on disk" if self.local_weights else ""
        return f"{devices}; {hub}{local}"

    def reachable(self, name: str) -> bool:
        return self.hub or name in self.local_weights


@dataclasses.dataclass(frozen=True)
class CuratedBackbone:
    """One row of the curated list: a strong transfer backbone, its family in the family test, its size tier."""

    name: str  # timm:<architecture>.<tag>
    family: str  # a key of tests/test_backbone_families.py's FAMILIES
    tier: Tier


def _rows(family: str, compact: str | None, base: str, large: str) -> tuple[CuratedBackbone, ...]:
    tiers: tuple[tuple[Tier, str | None], ...] = (("compact", compact), ("base", base), ("large", large))
    return tuple(CuratedBackbone(f"timm:{arch}", family, tier) for tier, arch in tiers if arch)


# ImageNet-21k/22k (or larger) pretraining transfers best; every license here allows commercial use.
CURATED: tuple[CuratedBackbone, ...] = (
    *_rows("convnext", "convnext_nano.in12k_ft_in1k", "convnext_tiny.fb_in22k_ft_in1k",
           "convnext_base.fb_in22k_ft_in1k"),
    *_rows("eva02", "eva02_tiny_patch14_336.mim_in22k_ft_in1k", "eva02_small_patch14_336.mim_in22k_ft_in1k",
           "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"),
    *_rows("dinov2_registers", "vit_small_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2.lvd142m",
           "vit_large_patch14_reg4_dinov2.lvd142m"),
    *_rows("efficientnetv2", "tf_efficientnetv2_b3.in21k_ft_in1k", "tf_efficientnetv2_s.in21k_ft_in1k",
           "tf_efficientnetv2_m.in21k_ft_in1k"),
    *_rows("siglip", None, "vit_base_patch16_siglip_224.webli", "vit_so400m_patch14_siglip_224.webli"),
)  # fmt: skip

# The families each preset searches, strongest transfer first; and the registered backbones it falls back on.
_FAMILIES: dict[Preset, tuple[str, ...]] = {
    "fast": ("convnext", "efficientnetv2"),
    "balanced": ("convnext", "eva02", "dinov2_registers"),
    "best": ("convnext", "eva02", "dinov2_registers", "efficientnetv2", "siglip"),
}
_REGISTERED: dict[Preset, tuple[str, ...]] = {
    "fast": ("tf_efficientnet_lite0", "mobilenetv2_100"),
    "balanced": ("tf_efficientnet_lite0", "tf_efficientnet_lite2", "mobilenetv2_100"),
    "best": ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_100"),
}
_TIER: dict[Machine, dict[Preset, Tier]] = {
    "cpu": {"fast": "compact", "balanced": "compact", "best": "compact"},
    "small_gpu": {"fast": "compact", "balanced": "compact", "best": "base"},
    "gpu": {"fast": "compact", "balanced": "base", "best": "base"},
    "large_gpu": {"fast": "base", "balanced": "base", "best": "large"},
}
_IMAGE_SIZE: dict[Machine, dict[Preset, int | None]] = {  # None: each backbone's native size
    "cpu": {"fast": 160, "balanced": 192, "best": 224},
    "small_gpu": {"fast": 192, "balanced": 224, "best": 224},
    "gpu": {"fast": 224, "balanced": 224, "best": None},
    "large_gpu": {"fast": 224, "balanced": None, "best": None},
}
_MACHINE_TEXT: dict[Machine, str] = {
    "cpu": "a CPU-only machine",
    "small_gpu": f"GPUs under {SMALL_GPU_GIB:g} GiB",
    "gpu": f"GPUs of {SMALL_GPU_GIB:g}-{LARGE_GPU_GIB:g} GiB",
    "large_gpu": f"GPUs of {LARGE_GPU_GIB:g} GiB or more",
}
_EPOCHS: dict[Preset, int] = {"fast": 4, "balanced": 8, "best": 16}
_TIME_BUDGET_S: dict[Preset, float] = {"fast": 600.0, "balanced": 1800.0, "best": 7200.0}
_TRIALS_PER_SLOT: dict[Preset, int] = {"fast": 4, "balanced": 8, "best": 16}
_MAX_CPU_TRIALS = 8  # CPU trials side by side at most: beyond it each would get too few threads to be quick


@dataclasses.dataclass(frozen=True)
class Choice:
    """One field a preset sets, the value, and the fact it follows from."""

    field: str  # dotted config field, e.g. "space.backbones"
    value: Any
    why: str
    yours: bool = False  # the user set this field: the preset leaves it as it is

    def line(self) -> str:
        shown = list(self.value) if isinstance(self.value, tuple) else self.value
        if self.yours:
            return f"{self.field}: yours kept (the preset would pick {shown}: {self.why})"
        return f"{self.field}: {shown}: {self.why}"


def _backbones(preset: Preset, hw: Hardware) -> tuple[list[str], str]:
    """The preset's backbones on ``hw``, and why: the curated ones of its tier when their weights are reachable;
    else those on disk topped up with registered ones (weights installed), or the registered ones alone."""
    tier = _TIER[hw.machine][preset]
    wanted = [r for f in _FAMILIES[preset] for r in CURATED if r.family == f and r.tier == tier]
    picked = [r.name for r in wanted if hw.reachable(r.name)]
    if len(picked) == len(wanted):
        why = f"{tier} tier for {_MACHINE_TEXT[hw.machine]}; " + (
            "the hub answers" if hw.hub else "their weights are on disk")
        left = [f for f in _FAMILIES[preset] if f not in {r.family for r in wanted}]
        return picked, why + (f"; {', '.join(left)} left out: no {tier} variant" if left else "")
    unreachable = f"the hub is unreachable ({hw.hub_note or 'not asked'})"
    if not picked:
        return list(_REGISTERED[preset]), f"the registered backbones, their weights installed: {unreachable}"
    topped = [*picked, *_REGISTERED[preset]][: len(wanted)]
    return topped, f"{tier}-tier ones whose weights are on disk, then registered ones: {unreachable}"


def _resources(preset: Preset, hw: Hardware) -> list[Choice]:
    """Trials side by side and what each asks for: one trial per GPU (two on a roomy GPU for compact
    backbones), else CPU trials that share the cores."""
    if not hw.gpus:
        slots = max(1, min(_MAX_CPU_TRIALS, hw.cpus // 2))
        threads = max(1, hw.cpus // slots)
        return [
            Choice("resources.gpus_per_trial", 0.0, "no GPU visible to torch.cuda"),
            Choice("resources.workers_per_trial", 1, "no GPU: one process per trial"),
            Choice("resources.cpus_per_worker", float(threads), f"{hw.cpus} CPUs shared by {slots} trial(s)"),
            Choice("search.max_concurrent_trials", slots, f"{hw.cpus} CPUs, two or more threads per trial"),
        ]
    compact = _TIER[hw.machine][preset] == "compact" and hw.machine != "small_gpu"
    per_trial = 0.5 if compact else 1.0
    slots = int(hw.gpus / per_trial)
    shared = "two compact-tier trials share each GPU" if compact else "one trial per GPU"
    return [
        Choice("resources.gpus_per_trial", per_trial, f"{shared}: {hw.gpus} GPU(s) on {_MACHINE_TEXT[hw.machine]}"),
        Choice("resources.workers_per_trial", 1, "more trials side by side search faster than one DDP trial"),
        Choice("resources.cpus_per_worker", float(max(1, hw.cpus // slots)), f"{hw.cpus} CPUs feed {slots} trial(s)"),
        Choice("search.max_concurrent_trials", slots, shared),
    ]  # fmt: skip


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}, got {name!r}")
    return cast(Preset, name)


def choose(name: str, hw: Hardware) -> list[Choice]:
    """Every field preset ``name`` sets on a machine like ``hw``, with the fact each follows from."""
    preset = _preset(name)
    backbones, why_backbones = _backbones(preset, hw)
    size = _IMAGE_SIZE[hw.machine][preset]
    resources = _resources(preset, hw)
    slots = next(c.value for c in resources if c.field == "search.max_concurrent_trials")
    large = _TIER[hw.machine][preset] == "large" and any(b.startswith("timm:") for b in backbones)
    batches = (16, 32) if not hw.gpus else (16, 32, 64) if large else (32, 64, 128)
    on = _MACHINE_TEXT[hw.machine]
    return [
        Choice("space.backbones", tuple(backbones), why_backbones),
        Choice("space.image_sizes", (size,) if size else (),
               f"{size} px on {on}" if size else f"each backbone's native size on {on}"),
        Choice("space.batch_sizes", batches, f"{'large-tier backbones' if large else 'batches'} on {on}"),
        Choice("space.max_epochs", _EPOCHS[preset], f"preset {preset}: epochs per trial"),
        Choice("search.time_budget_s", _TIME_BUDGET_S[preset], f"preset {preset}: the sweep's wall-clock budget"),
        Choice("search.num_samples", _TRIALS_PER_SLOT[preset] * slots,
               f"{_TRIALS_PER_SLOT[preset]} trials for each of the {slots} running side by side"),
        *resources,
    ]  # fmt: skip


def apply_preset(config: ExperimentConfig, hardware: Hardware | None = None) -> tuple[ExperimentConfig, list[Choice]]:
    """``config`` with its preset's choices in every field the user left unset, and those choices (the ones the
    user set marked ``yours``). No preset: ``config`` as it is. ``hardware`` defaults to this machine's."""
    if config.preset is None:
        return config, []
    hw = hardware if hardware is not None else detect_hardware()
    if "gpus_per_trial" in config.resources.model_fields_set and config.resources.gpus_per_trial == 0:
        hw = dataclasses.replace(hw, gpu_memory_gib=())  # the user keeps the GPUs out of this sweep
    choices = []
    sections: dict[str, dict[str, Any]] = {}
    for choice in choose(config.preset, hw):
        section, key = choice.field.split(".")
        mine = key in getattr(config, section).model_fields_set
        choices.append(dataclasses.replace(choice, yours=mine))
        if not mine:
            sections.setdefault(section, {})[key] = choice.value
    raw: dict[str, Any] = {"preset": config.preset}
    for name in ("data", "space", "search", "resources"):
        raw[name] = {**sections.get(name, {}), **getattr(config, name).model_dump(exclude_unset=True)}
    return load_config(raw), choices


def explain(preset: str, hardware: Hardware, choices: list[Choice]) -> list[str]:
    """The lines that say what ``preset`` picked on ``hardware`` and why: one per choice."""
    return [f"preset {preset} on {hardware.describe()}", *(c.line() for c in choices)]


def resolve_preset(config: ExperimentConfig) -> ExperimentConfig:
    """What a sweep starts from: ``config`` with its preset applied for this machine, each choice logged."""
    if config.preset is None:
        return config
    hardware = detect_hardware()
    resolved, choices = apply_preset(config, hardware)
    for line in explain(config.preset, hardware, choices):
        logger.info(line, extra={"stage": "preset"})
    return resolved


def _gpu_memory_gib() -> tuple[float, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(torch.cuda.device_count()))


def detect_hardware(timeout_s: float | None = None) -> Hardware:
    """This machine: its CPUs, the GPUs torch.cuda sees, the curated backbones whose weights are on disk, and
    whether the hub answers for the others (one bounded request: the pre-flight's own)."""
    from automl_tl.backbones import TimmHub, timm_weights_source, weights_status
    from automl_tl.backbones._hub import HUB_TIMEOUT_S, hub_reasons

    sources = {row.name: timm_weights_source(row.name) for row in CURATED}
    local = frozenset(n for n, source in sources.items() if weights_status(source) == "ready")
    remote = {n: source for n, source in sources.items() if n not in local and isinstance(source, TimmHub)}
    note = ""
    hub = False
    if remote:
        name, source = next(iter(remote.items()))
        reason = hub_reasons({name: source}, HUB_TIMEOUT_S if timeout_s is None else timeout_s)[name]
        hub, note = reason is None, reason or ""
    return Hardware(os.cpu_count() or 1, _gpu_memory_gib(), hub, local, note)
