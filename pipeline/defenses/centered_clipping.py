"""Centered clipping (Karimireddy, He & Jaggi, "Learning from history for Byzantine robust
optimization", ICML 2021).

The step starts from the last round's step ``v`` (the history: 0 in the first round) and moves
``L`` times by the mean of the updates' offsets from it, each clipped to L2 norm ``tau``:

    v <- v + (1 / n) sum_i (x_i - v) min(1, tau / ||x_i - v||).

An update far from the history moves the step by at most ``tau / n``. ``tau = 0`` (the default)
takes ``tau`` as the median of ``||x_i - v||`` over the round's whole updates, at the first
iteration: the paper tunes ``tau`` per task, and the median needs no tuning to the model's update
size (as ``norm_clipping``'s default). With an explicit ``tau`` and ``v`` from 0, byzfl's
``CenteredClipping(L=L, tau=tau)`` called round after round (tested equal). Partial (masked)
uploads have no norm: refused.

Parameters (``defense.centered_clipping``): ``tau`` >= 0 (0: the round's median distance),
``iterations`` L >= 1 (default 1, the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number, whole_number


def centered_clip(x: torch.Tensor, start: torch.Tensor, tau: float, iterations: int) -> torch.Tensor:
    """``iterations`` centered-clipping steps of the rows of ``x`` (n, P) from ``start`` (P,); ``tau = 0``:
    the median distance of the rows from ``start``. (P,)."""
    v = start.to(x.dtype)
    for i in range(iterations):
        offsets = x - v
        distances = torch.linalg.vector_norm(offsets, dim=1, dtype=torch.float64)
        if i == 0 and tau == 0:
            tau = float(torch.quantile(distances, 0.5))
        scale = torch.where(distances > tau, tau / distances.clamp_min(1e-300), 1.0)
        v = v + (scale.to(x.dtype) @ offsets) / len(x)
    return v


@dataclass
class CenteredClippingParams(DefenseParams):
    tau: float = 0.0  # clipping radius around the history; 0: the round's median distance from it
    iterations: int = 1  # L

    def validate(self, key: str) -> None:
        check(finite_number(self.tau) and self.tau >= 0, f"{key}.tau",
              "must be a finite number >= 0 (0: the round's median distance)", self.tau)
        check(whole_number(self.iterations) and self.iterations >= 1,
              f"{key}.iterations", "must be an integer >= 1", self.iterations)


@register
class CenteredClipping(Defense):
    """Clip every update's offset from the last step to ``tau``, move the step by their mean; nobody is left out."""

    name = "centered_clipping"
    summary = "centered clipping (Karimireddy et al. 2021): clip offsets from the last step to tau, average them"
    Params = CenteredClippingParams
    flags = "none"
    composable = True

    def __init__(self, params, server) -> None:
        super().__init__(params, server)
        self.history: torch.Tensor | None = None  # the last round's step

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        rows = complete_rows(updates).nonzero().squeeze(1)
        start = torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device) if self.history is None \
            else self.history.to(updates.device)
        if len(rows) == 0:
            return Aggregate(start)
        self.history = centered_clip(updates[rows], start, self.params.tau, self.params.iterations)
        return Aggregate(self.history)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.history is None else {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state.get("history")
