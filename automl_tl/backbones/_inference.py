"""A built member made ready to answer: eval mode, on its device in the memory layout that is fastest there."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the caller that holds a model; the flags below must not need it
    import torch

__all__ = ["AB_OFF_ENV", "ab_off", "ready_for_inference"]

# Private, for ``benchmarks/bench_serve.py --ab`` alone: the speed mechanisms named here (comma-separated) run
# as if they were absent, so the benchmark can time the serving code with and without each in the same run.
AB_OFF_ENV = "AUTOML_TL_AB_OFF"


def ab_off(mechanism: str) -> bool:
    """Whether this process runs without ``mechanism`` (see :data:`AB_OFF_ENV`)."""
    return mechanism in os.environ.get(AB_OFF_ENV, "").split(",")


def ready_for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in eval mode on ``device``, in the memory layout that is fastest there."""
    from automl_tl.backbones._builder import memory_format_for

    return model.eval().to(device).to(memory_format=memory_format_for(device)).eval()
