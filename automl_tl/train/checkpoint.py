"""A trial's checkpoint (to resume exactly where it was) and its best epoch's files (what the artifact is
built from), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from automl_tl.train.trial_data import TrialData
from automl_tl.backbones import TransferNet, resolve_spec
from automl_tl.runs.storage import atomic_path, write_atomic
from automl_tl.train.trial_config import TrialConfig

__all__ = ["load_checkpoint", "save_checkpoint", "write_best"]


def flat_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as named tensors (for safetensors) plus JSON scalars: no pickles in checkpoints."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = value
    return tensors, scalars


def save_checkpoint(path: Path, model: TransferNet, optimizer: torch.optim.Optimizer, schedule: Any, state: dict[str, Any], cfg: TrialConfig) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    tensors, scalars = flat_optimizer_state(optimizer)
    save_file(tensors, str(path / "optimizer.safetensors"))
    meta = {"state": state, "optimizer": scalars, "schedule": schedule.state_dict(), "trial": cfg.to_dict()}
    (path / "state.json").write_text(json.dumps(meta, default=_json_default), encoding="utf-8")


def load_checkpoint(path: Path, model: TransferNet, optimizer: torch.optim.Optimizer, schedule: Any) -> dict[str, Any]:
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["optimizer"]["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
    resumed: dict[str, Any] = meta["state"]
    return resumed


def write_best(
    out_dir: Path, model: TransferNet, val_probs: np.ndarray, cfg: TrialConfig, data: TrialData, epoch: int,
    scores: dict[str, float], accumulation_steps: int = 1, notes: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as partial:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(partial))
    np.save(out_dir / "val_probs.npy", val_probs.astype(np.float32))
    spec = resolve_spec(cfg.backbone)
    info = {
        **cfg.to_dict(),
        "num_classes": len(data.class_names),
        "class_names": list(data.class_names),
        "preprocessing": cfg.preprocessing().to_dict(),
        "spec": spec.to_dict(),
        "best_epoch": epoch,
        "val_metrics": scores,
        "accumulation_steps": accumulation_steps,  # above 1: trained in micro-batches after running out of memory
        "data_id": data.data_id,
        **(notes or {}),
    }
    write_atomic(out_dir / "trial.json", json.dumps(info, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
