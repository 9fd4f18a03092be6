"""Mean around the median (MeaMed: Xie, Koyejo & Gupta, "Generalized Byzantine-tolerant SGD", 2018).

Per coordinate, the mean of the ``n - f`` values nearest that coordinate's median (Bulyan's
second step, ``median.closest_to_median_mean``; ties: the lower row first), with
``f = floor(byzantine_fraction x n)`` lowered to ``(n - 1) // 2``. byzfl's ``Meamed(f)`` (tested equal). Over the round's whole updates; partial (masked) uploads are refused.

Parameters (``defense.meamed``): ``byzantine_fraction`` in [0, 0.5) (default 0.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check
from pipeline.defenses.krum import assumed_attackers
from pipeline.defenses.median import closest_to_median_mean


@dataclass
class MeamedParams(DefenseParams):
    byzantine_fraction: float = 0.3  # f = floor(fraction x n) values left out per coordinate

    def validate(self, key: str) -> None:
        check(0 <= self.byzantine_fraction < 0.5, f"{key}.byzantine_fraction", "must be in [0, 0.5)",
              self.byzantine_fraction)


@register
class Meamed(Defense):
    """Every coordinate's mean of the ``n - f`` values nearest its median; nobody is left out."""

    name = "meamed"
    summary = "mean around the median (Xie et al. 2018): per coordinate, the n - f values nearest the median"
    Params = MeamedParams
    flags = "none"
    composable = True
    search_ranges = {"byzantine_fraction": (0.05, 0.45, False)}

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        rows = complete_rows(updates).nonzero().squeeze(1)
        if len(rows) == 0:
            return Aggregate(torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device))
        f = assumed_attackers(self.params.byzantine_fraction, len(rows), (len(rows) - 1) // 2)
        return Aggregate(closest_to_median_mean(updates[rows], len(rows) - f))
