"""The logistic-regression probe: a head fitted to convergence on frozen features, its L2 strength chosen on
validation data. Plain torch (full-batch L-BFGS), no scikit-learn.

A trial whose optimizer is ``lbfgs`` and whose backbone is fully frozen is exactly this probe: the classic
transfer-learning baseline that the sweep must never end below. A trial with ``lbfgs`` that trains more than
the head starts from the probe's head and then fine-tunes (LP-FT: a converged head does not send large,
random gradients back into the pretrained layers).

    .venv/bin/python -m pytest -q tests/test_crossval.py
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_tl.evaluate.metrics import log_loss

__all__ = ["L2_GRID", "ProbeFit", "fit_head", "fit_probe", "head_probs", "one_thread"]

# Strengths of the L2 penalty on the mean cross-entropy (sklearn's C is 1 / (l2 * n_train)), strongest first:
# each fit starts from the previous, more regularised one, so the path is cheap to follow.
L2_GRID: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(0.0, -6.01, -0.5))


@dataclasses.dataclass(frozen=True)
class ProbeFit:
    """The chosen L2 strength, the head's validation probabilities and each strength's validation log loss."""

    l2: float
    val_probs: np.ndarray
    path: tuple[tuple[float, float], ...]


def fit_head(
    head: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float, weight: torch.Tensor | None = None,
    max_iter: int = 200,
) -> float:  # fmt: skip
    """Minimise mean cross-entropy + ``l2 / 2 * ||W||^2`` (weight matrices, not biases) with L-BFGS; the loss."""
    head.eval()  # no dropout: a deterministic objective that L-BFGS can converge on
    params = [p for p in head.parameters() if p.requires_grad]
    penalised = [p for p in params if p.ndim > 1]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-6, tolerance_change=1e-9)  # fmt: skip
    x, y = x.float(), y.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(x), y, weight=weight)
        loss = loss + 0.5 * l2 * sum((p * p).sum() for p in penalised)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad(), one_thread():
        optimizer.step(closure)  # type: ignore[no-untyped-call]
        return float(closure().detach())


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """A head's matrices are small: one thread runs them without waiting on busy cores for the others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def head_probs(head: nn.Module, x: torch.Tensor) -> np.ndarray:
    head.eval()
    probs: np.ndarray = torch.softmax(head(x.float()).float(), dim=1).numpy()
    return probs


def fit_probe(
    head: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: np.ndarray,
    weight: torch.Tensor | None = None,
    grid: tuple[float, ...] = L2_GRID,
) -> ProbeFit:
    """Fit ``head`` along ``grid`` and leave it at the strength of lowest validation log loss.

    Log loss, not accuracy, chooses: on a small validation split many strengths tie on accuracy.
    """
    best: tuple[float, float, dict[str, torch.Tensor], np.ndarray] | None = None
    path = []
    for l2 in sorted(grid, reverse=True):
        fit_head(head, train_x, train_y, l2, weight)
        probs = head_probs(head, val_x)
        loss = log_loss(val_y, probs)
        path.append((l2, loss))
        if best is None or loss < best[0]:
            best = (loss, l2, copy.deepcopy(head.state_dict()), probs)
    if best is None:
        raise ValueError("fit_probe needs at least one L2 strength in grid")
    head.load_state_dict(best[2])
    return ProbeFit(best[1], best[3], tuple(path))
