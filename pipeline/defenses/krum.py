"""Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine
learning with adversaries: Byzantine tolerant gradient descent", NeurIPS 2017).

Each update is scored by the sum of its squared L2 distances to its
``n - f - 2`` nearest other updates; Krum keeps the lowest-scoring update
(Multi-Krum, :mod:`pipeline.defenses.multi_krum`, averages the ``m`` lowest-scoring ones). Ties in score go to the
lower row.

Assumed attackers: ``f = floor(byzantine_fraction * n)`` over the ``n`` usable
rows, lowered to ``n - 3`` when larger (a score needs ``n - f - 2 >= 1``
neighbours). Usable rows are the complete ones: a user absent this round or
with a partial (DSSGD-masked) upload has no whole vector and gets weight 0.
With fewer than 3 usable rows the rule is undefined and the step is the plain
mean of the usable rows (each with an equal weight).

Neighbour count: the paper's ``n - f - 2``. byzfl's ``Krum(g)`` /
``MultiKrum(g)`` use ``n - g - 1`` neighbours, so ``krum_scores(x, f)`` orders
rows as byzfl does with ``g = f + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads, complete_rows, weighted_mean
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """(n, n) squared L2 distances between the rows of ``x`` in float64, from
    one Gram matrix (rows centred first, for less cancellation); exactly
    symmetric, >= 0, diagonal 0."""
    x = x.double()
    x = x - x.mean(0)
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min(0)
    d = 0.5 * (d + d.T)
    return d.fill_diagonal_(0)


def neighbour_scores(d: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's sum of its ``k`` smallest entries of ``d`` off the diagonal; (n,)."""
    off = d.clone().fill_diagonal_(math.inf)
    return off.topk(k, dim=1, largest=False).values.sum(1)


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row of ``x`` (n, P): the sum of its squared distances
    to its ``n - f - 2`` nearest other rows (float64, (n,))."""
    k = x.shape[0] - f - 2
    if k < 1:
        raise ValueError(f"Krum needs n - f - 2 >= 1, got n={x.shape[0]}, f={f}")
    return neighbour_scores(pairwise_sq_distances(x), k)


def multi_krum_select(x: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Indices of the ``m`` rows of ``x`` with the lowest Krum scores, best
    first (ties: lower index). Krum is ``m = 1``."""
    return torch.argsort(krum_scores(x, f), stable=True)[:m]


def assumed_attackers(fraction: float, n: int, f_max: int) -> int:
    """``floor(fraction * n)`` (with a 1e-9 tolerance, so 0.29 * 100 gives 29), clamped to [0, f_max]."""
    return max(0, min(math.floor(fraction * n + 1e-9), f_max))


@dataclass
class KrumParams(DefenseParams):
    byzantine_fraction: float = 0.3  # assumed attackers f = floor(fraction * usable rows), lowered to n - 3

    def validate(self, key: str) -> None:
        check(0 <= self.byzantine_fraction < 0.5, f"{key}.byzantine_fraction", "must be in [0, 0.5)",
              self.byzantine_fraction)


def plain_mean(updates: torch.Tensor, usable: torch.Tensor) -> Aggregate:
    """Fewer than 3 whole updates, where Krum-style selections are undefined: the plain mean of the usable rows."""
    weights = usable.to(updates.dtype) / max(int(usable.sum()), 1)
    return Aggregate(weighted_mean(updates, weights), weights)


def equal_weights(updates: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Weight 1 / len(chosen) for the chosen rows of ``updates``, 0 for the others. (users,)."""
    weights = torch.zeros(updates.shape[0], dtype=updates.dtype, device=updates.device)
    weights[chosen] = 1 / len(chosen)
    return weights


@register
class Krum(Defense):
    """Krum: the step is the one complete update with the lowest Krum score;
    every other user is left out this round."""

    name = "krum"
    summary = "Krum (Blanchard et al. 2017): keep the update closest to its n - f - 2 nearest neighbours"
    Params = KrumParams
    search_ranges = {"byzantine_fraction": (0.05, 0.45, False)}
    flags = "round"
    composable = True
    handles_missing = False

    def num_selected(self, n: int, f: int) -> int:
        return 1

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        usable = complete_rows(updates)
        rows = usable.nonzero().squeeze(1)
        n = len(rows)
        if n < 3:
            return plain_mean(updates, usable)
        f = assumed_attackers(self.params.byzantine_fraction, n, n - 3)
        chosen = rows[multi_krum_select(updates[rows], f, self.num_selected(n, f))]
        return Aggregate(updates[chosen].mean(0), equal_weights(updates, chosen))
