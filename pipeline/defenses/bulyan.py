"""Bulyan (El Mhamdi, Guerraoui & Rouault, "The hidden vulnerability of
distributed learning in Byzantium", ICML 2018).

Selection: ``theta = n - 2f`` rows, by applying Krum to the remaining rows
again and again (the chosen row leaves the set; scores are recomputed on the
rest from the one distance matrix). Krum on ``r`` remaining rows sums the
squared distances to the ``r - f - 2`` nearest others, at least 1 (the last
selections have fewer: ``r`` ends at ``2f + 1``); ties go to the lower row.
Aggregation: per coordinate, the mean of the ``beta = theta - 2f`` selected
values closest to the selected values' median (``median.closest_to_median_mean``, also MeaMed's;
ties in distance: the lower row).

Assumed attackers: ``f = floor(byzantine_fraction * n)`` over the ``n`` usable
(complete) rows, lowered to the largest with ``n >= 4f + 3``. With fewer than 3
usable rows the step is the plain mean of the usable rows. Weights: ``1 / theta``
for each selected user (the step is not their plain mean), 0 for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check
from pipeline.defenses.krum import (assumed_attackers, equal_weights, neighbour_scores, pairwise_sq_distances,
                                    plain_mean)
from pipeline.defenses.median import closest_to_median_mean


def bulyan_select(x: torch.Tensor, f: int) -> torch.Tensor:
    """Indices of the ``n - 2f`` rows of ``x`` (n, P) chosen by iterated Krum, in the order chosen."""
    n = x.shape[0]
    d = pairwise_sq_distances(x)
    remaining = torch.ones(n, dtype=torch.bool, device=x.device)
    chosen = []
    for r in range(n, 2 * f, -1):  # r rows remain
        k = min(max(r - f - 2, 1), r - 1)
        scores = neighbour_scores(d.masked_fill(~remaining[None, :], math.inf), k)
        best = int(torch.argmin(scores.masked_fill(~remaining, math.inf)))  # first minimum
        remaining[best] = False
        chosen.append(best)
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def bulyan(x: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bulyan of the rows of ``x`` (n, P) with ``n >= 4f + 3``: (step (P,), selected row indices)."""
    if x.shape[0] < 4 * f + 3:
        raise ValueError(f"Bulyan needs n >= 4f + 3, got n={x.shape[0]}, f={f}")
    selected = bulyan_select(x, f)
    return closest_to_median_mean(x[selected], len(selected) - 2 * f), selected


@dataclass
class BulyanParams(DefenseParams):
    byzantine_fraction: float = 0.2  # assumed attackers f = floor(fraction * usable rows), lowered to (n - 3) // 4

    def validate(self, key: str) -> None:
        check(0 <= self.byzantine_fraction < 0.25, f"{key}.byzantine_fraction", "must be in [0, 0.25) (n >= 4f + 3)",
              self.byzantine_fraction)


@register
class Bulyan(Defense):
    """Bulyan: iterated Krum picks ``n - 2f`` complete updates, then a
    per-coordinate mean around their median; users never picked are left out."""

    name = "bulyan"
    summary = "Bulyan (El Mhamdi et al. 2018): iterated Krum selection, then per-coordinate mean around the median"
    Params = BulyanParams
    search_ranges = {"byzantine_fraction": (0.05, 0.24, False)}
    flags = "round"
    composable = True
    handles_missing = False

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        usable = complete_rows(updates)
        rows = usable.nonzero().squeeze(1)
        n = len(rows)
        if n < 3:
            return plain_mean(updates, usable)
        f = assumed_attackers(self.params.byzantine_fraction, n, (n - 3) // 4)
        step, selected = bulyan(updates[rows], f)
        return Aggregate(step, equal_weights(updates, rows[selected]))
