"""How long a member's forward takes, measured on the machine at hand rather than guessed from its size.

The artifact's builder times every candidate trial at batch 1 and batch 8 (:data:`LATENCY_BATCH_SIZES`) and
writes the figures beside each member in the manifest (``members[i].latency_ms``); ensemble selection under
``search.latency_budget_ms`` and the cascade's choice of its cheap member read them. Each serving replica
times its own members again when it starts and shows both in ``/v1/metadata``, since the serving machine may
differ from the one that built the artifact.

Trials sharing an architecture (backbone, head, input size, classes) cost the same, so each architecture
is built (without weights: the cost does not depend on them) and timed once.

    .venv/bin/python -m pytest -q tests/test_cascade.py
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["LATENCY_BATCH_SIZES", "LATENCY_KEY", "latency_key", "time_forward_ms", "trial_latency_ms", "where_timed"]

LATENCY_BATCH_SIZES: tuple[int, ...] = (1, 8)
# The figure that selection and the cascade compare: a lone request's forward, members run one after another.
LATENCY_KEY = "batch_1"


def latency_key(batch_size: int) -> str:
    """The manifest's name of the figure for ``batch_size`` (``batch_1``, ``batch_8``)."""
    return f"batch_{batch_size}"


def time_forward_ms(
    forward: Callable[[torch.Tensor], object], example: torch.Tensor, repeats: int = 5
) -> dict[str, float]:
    """Fastest milliseconds of ``forward`` on a batch of ``example`` (one CHW image) at each of
    :data:`LATENCY_BATCH_SIZES`, over ``repeats`` calls after an untimed one (lazy set-up is not the model's
    cost). The fastest, not the median: other work on a shared machine only ever adds time, so the minimum is
    the model's own cost, and members timed at different moments stay comparable."""
    out: dict[str, float] = {}
    for size in LATENCY_BATCH_SIZES:
        batch = example.unsqueeze(0).repeat(size, 1, 1, 1)
        forward(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward(batch)
            times.append((time.perf_counter() - start) * 1000.0)
        out[latency_key(size)] = round(min(times), 3)
    return out


def where_timed(threads: int = 1) -> str:
    """The machine the figures describe, in words (latency depends on it as much as on the model)."""
    import os

    return f"cpu, {threads} torch thread(s) of {os.cpu_count()} core(s)"


def trial_latency_ms(infos: Mapping[str, Mapping[str, Any]], repeats: int = 5) -> dict[str, dict[str, float]]:
    """Each trial's forward latency on one CPU thread (``trial.json`` of each trial id), one timing per
    architecture. One thread, as a serving replica's forward lane runs, and a figure that other work on the
    machine disturbs least."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(infos, repeats)
    finally:
        torch.set_num_threads(threads)


def _timed(infos: Mapping[str, Mapping[str, Any]], repeats: int) -> dict[str, dict[str, float]]:
    from automl_tl.backbones import create_backbone
    from automl_tl.inference.core import MemberRunner

    timed: dict[tuple[Any, ...], dict[str, float]] = {}
    out: dict[str, dict[str, float]] = {}
    for trial_id, info in infos.items():
        size = int(info["preprocessing"]["input_size"])
        head = str(info.get("head", "linear"))
        key = (str(info["backbone"]), head, size, int(info["num_classes"]))
        if key not in timed:
            model = create_backbone(key[0], num_classes=key[3], pretrained=False, head=head, image_size=size)
            runner = MemberRunner([model], "cpu")
            timed[key] = time_forward_ms(lambda b: runner.forward_batch(0, b), torch.zeros(3, size, size), repeats)
        out[trial_id] = dict(timed[key])
    return out
