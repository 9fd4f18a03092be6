"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett,
"Byzantine-robust distributed learning: towards optimal statistical rates",
ICML 2018).

Per coordinate, of the ``c`` users who uploaded it (non-NaN), the
``k = floor(beta * c)`` smallest and ``k`` largest values are dropped and the
rest averaged; 0 where nobody uploaded. ``floor`` has a 1e-9 tolerance (so
0.29 * 100 trims 29), and ``k`` never leaves fewer than one value. With whole
uploads and ``beta * n = f`` this is byzfl's ``TrMean(f)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, sort_columns


def coordinate_trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Per column of ``x`` (n, P), the mean of its non-NaN values without the
    ``floor(beta * count)`` smallest and largest ones; 0 where all NaN. (P,)."""
    ordered = sort_columns(x)  # NaN sort last
    count = (~torch.isnan(x)).sum(0)
    k = torch.floor(beta * count.double() + 1e-9).long()
    k = torch.minimum(k, ((count - 1) // 2).clamp_min(0))
    rank = torch.arange(x.shape[0], device=x.device)[:, None]
    keep = (rank >= k) & (rank < count - k)
    total = torch.where(keep, ordered, 0).sum(0)
    kept = count - 2 * k
    return torch.where(kept > 0, total / kept.clamp_min(1), 0).to(x.dtype)


@dataclass
class TrimmedMeanParams(DefenseParams):
    beta: float = 0.1  # fraction trimmed from each end of every coordinate

    def validate(self, key: str) -> None:
        check(0 <= self.beta < 0.5, f"{key}.beta", "must be in [0, 0.5)", self.beta)


@register
class TrimmedMean(Defense):
    """Every coordinate's trimmed mean over the users who uploaded it; nobody is left out."""

    name = "trimmed_mean"
    summary = "coordinate-wise trimmed mean (Yin et al. 2018): drop the beta fraction at each end, average the rest"
    Params = TrimmedMeanParams
    search_ranges = {"beta": (0.0, 0.45, False)}
    flags = "none"
    composable = True
    handles_missing = True

    def aggregate(self, uploads: Uploads) -> Aggregate:
        return Aggregate(coordinate_trimmed_mean(uploads.updates, self.params.beta))
