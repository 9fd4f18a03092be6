"""Geometric median (RFA: Pillutla, Kakade & Harchaoui, "Robust aggregation for federated
learning", IEEE Transactions on Signal Processing 2022).

The step is an approximation of the geometric median of the round's whole updates,
``argmin_z sum_i ||z - x_i||``, by the smoothed Weiszfeld algorithm: ``T`` times,

    beta_i = 1 / max(nu, ||z - x_i||),    z = sum_i beta_i x_i / sum_i beta_i,

from ``z = 0`` (no update). ``nu`` > 0 smooths the objective where ``z`` meets an update (and
bounds any one user's weight by ``1 / nu``); Pillutla et al. find a few iterations enough. Users
weigh equally (RFA's weights are the users' data sizes; ours have equal shares in the mean).
With ``T = 3`` and ``nu = 0.1``, byzfl's ``GeometricMedian`` (tested equal). Partial (masked)
uploads have no norm: refused.

Parameters (``defense.geometric_median``): ``iterations`` T >= 1 (default 3), ``nu`` > 0 (0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number, whole_number


def smoothed_weiszfeld(x: torch.Tensor, iterations: int, nu: float) -> torch.Tensor:
    """The smoothed Weiszfeld estimate of the geometric median of the rows of ``x`` (n, P), from 0. (P,)."""
    z = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        beta = 1 / torch.linalg.vector_norm(x - z, dim=1, dtype=torch.float64).clamp_min(nu)
        z = (beta / beta.sum()).to(x.dtype) @ x
    return z


@dataclass
class GeometricMedianParams(DefenseParams):
    iterations: int = 3  # T: smoothed Weiszfeld iterations
    nu: float = 0.1  # smoothing: no update's weight above 1 / nu

    def validate(self, key: str) -> None:
        check(whole_number(self.iterations) and self.iterations >= 1,
              f"{key}.iterations", "must be an integer >= 1", self.iterations)
        check(finite_number(self.nu) and self.nu > 0, f"{key}.nu", "must be a finite number > 0", self.nu)


@register
class GeometricMedian(Defense):
    """The smoothed Weiszfeld geometric median of the whole updates; nobody is left out."""

    name = "geometric_median"
    summary = "geometric median (RFA, Pillutla et al. 2022): smoothed Weiszfeld iterations from 0"
    Params = GeometricMedianParams
    flags = "none"
    composable = True
    search_ranges = {"nu": (1e-3, 1.0, True)}

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        rows = complete_rows(updates).nonzero().squeeze(1)
        if len(rows) == 0:
            return Aggregate(torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device))
        return Aggregate(smoothed_weiszfeld(updates[rows], self.params.iterations, self.params.nu))
