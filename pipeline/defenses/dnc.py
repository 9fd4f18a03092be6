"""Divide-and-Conquer (Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning", NDSS 2021, Algorithm 2).

Each round, over the ``n`` users with a whole upload, ``f = floor(byzantine_fraction * n)`` assumed
attackers and ``r = ceil(c * f)`` removals (``c`` the filtering fraction), every one of ``niters``
iterations:

1. draws ``b`` coordinates at random without replacement (``b >= P``: all ``P``, no draw);
2. centres the sub-sampled rows by their mean ``mu``;
3. takes ``v``, the top right singular vector of the centred ``(n, b)`` matrix
   (``torch.linalg.svd``; its sign does not matter, the score is squared);
4. scores each user ``((x_i - mu) . v)^2``, its squared projection on the direction of largest spread,
   and keeps the ``n - r`` lowest scores (ties: the lower row kept).

The users kept in every iteration (the intersection) are the round's good set; the step is their plain
mean, with weight ``1 / |kept|`` each (0 for the others). Several iterations may keep disjoint sets
(the paper does not say what then): nobody is kept and the step is zero.

Choices where the paper leaves room:

- the removal count: the paper keeps the ``n - c m`` lowest scores without rounding ``c m``; we remove
  ``ceil(c f)`` (keep ``floor(n - c f)``), as the authors' and FLPoison's code (``int(n - c m)``) do.
  ``c <= 2`` and ``f < n / 2`` leave at least one user;
- ``f``: the paper takes the number of attackers ``m`` as known; we assume ``floor(fraction * n)`` of the
  round's usable rows (as Krum's ``byzantine_fraction``), so the rule follows sampled rounds and absent users;
- the defaults ``niters = 1``, ``b = 10000``, ``c = 1`` are those of the paper's experiments as we recall
  them (the paper is not on this machine); FLPoison runs 5 iterations on 20 % of the coordinates;
- the draws come from a generator keyed by ``(run seed, round)`` on the CPU (one ``randperm(P)`` per
  iteration, its first ``b``): the same users kept on every device and after a resume;
- the scores are computed in float64, whatever the updates' dtype.

With fewer than 2 whole uploads (no spread to project on) the step is the plain mean of the usable rows.
Partial (DSSGD-masked) uploads have no whole vector: refused.

Parameters (``defense.dnc``): ``iterations`` niters >= 1 (default 1), ``subsample_dim`` b >= 1 (default
10000; >= the model's parameters: all of them), ``filter_fraction`` c in (0, 2] (default 1.0),
``byzantine_fraction`` in [0, 0.5) (default 0.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.device import seeded_generator
from pipeline.core.server import Aggregate, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number, whole_number
from pipeline.defenses.krum import assumed_attackers, equal_weights, plain_mean

DNC_STREAM = 2**32 - 10  # DnC's coordinate draws, apart from every other random stream


def outlier_scores(x: torch.Tensor) -> torch.Tensor:
    """``((x_i - mu) . v)^2`` for the rows of ``x`` (n, b): ``mu`` their mean, ``v`` the top right singular
    vector of the centred matrix. float64 (n,)."""
    centred = x.double() - x.double().mean(0)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return (centred @ v) ** 2


def removed_count(n: int, byzantine_fraction: float, filter_fraction: float) -> int:
    """``ceil(c * f)`` users removed per iteration, ``f = floor(fraction * n)``; at most ``n - 1``. Both
    rounded with a 1e-9 tolerance: 0.29 x 100 is 29 attackers, and c = 0.28 of 25 removes 7 (7.000000000000001
    in floats)."""
    f = assumed_attackers(byzantine_fraction, n, n - 1)
    return min(math.ceil(filter_fraction * f - 1e-9), n - 1)


def dnc_kept(x: torch.Tensor, iterations: int, subsample_dim: int, removed: int,
             generator: torch.Generator) -> torch.Tensor:
    """The rows of ``x`` (n, P) DnC keeps (bool (n,)): in each iteration the ``n - removed`` lowest outlier
    scores on ``subsample_dim`` coordinates drawn from the CPU ``generator``, intersected over iterations."""
    n, size = x.shape
    kept = torch.ones(n, dtype=torch.bool, device=x.device)
    for _ in range(iterations):
        if subsample_dim >= size:
            sub = x
        else:  # a fresh draw without replacement each iteration
            sub = x[:, torch.randperm(size, generator=generator)[:subsample_dim].to(x.device)]
        order = torch.argsort(outlier_scores(sub), stable=True)  # ties: the lower row first, kept
        this = torch.zeros(n, dtype=torch.bool, device=x.device)
        this[order[:n - removed]] = True
        kept &= this
    return kept


@dataclass
class DncParams(DefenseParams):
    iterations: int = 1  # niters: independent sub-samplings; a user must pass all of them
    subsample_dim: int = 10000  # b: coordinates drawn per iteration; >= the model's parameters: all
    filter_fraction: float = 1.0  # c: ceil(c x f) highest scores removed per iteration
    byzantine_fraction: float = 0.3  # assumed attackers f = floor(fraction x usable rows)

    def validate(self, key: str) -> None:
        check(whole_number(self.iterations) and self.iterations >= 1, f"{key}.iterations",
              "must be an integer >= 1", self.iterations)
        check(whole_number(self.subsample_dim) and self.subsample_dim >= 1, f"{key}.subsample_dim",
              "must be an integer >= 1 (>= the model's parameters: all of them)", self.subsample_dim)
        check(finite_number(self.filter_fraction) and 0 < self.filter_fraction <= 2, f"{key}.filter_fraction",
              "must be a finite number in (0, 2] (ceil(c x f) removed; c <= 2 keeps a user)", self.filter_fraction)
        check(finite_number(self.byzantine_fraction) and 0 <= self.byzantine_fraction < 0.5,
              f"{key}.byzantine_fraction", "must be in [0, 0.5)", self.byzantine_fraction)


@register
class Dnc(Defense):
    """Divide-and-Conquer: drop the users whose updates project furthest on the top singular direction of
    random coordinate subsets, average the rest; the dropped are left out this round."""

    name = "dnc"
    summary = "Divide-and-Conquer (Shejwalkar & Houmansadr 2021): drop the top SVD-projection outliers, average"
    Params = DncParams
    search_ranges = {"byzantine_fraction": (0.05, 0.45, False)}
    flags = "round"
    composable = True
    handles_missing = False

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        usable = complete_rows(updates)
        rows = usable.nonzero().squeeze(1)
        n = len(rows)
        if n < 2:
            return plain_mean(updates, usable)
        p = self.params
        generator = seeded_generator(self.server.seed, uploads.round, DNC_STREAM)
        removed = removed_count(n, p.byzantine_fraction, p.filter_fraction)
        chosen = rows[dnc_kept(updates[rows], p.iterations, p.subsample_dim, removed, generator)]
        if len(chosen) == 0:  # iterations that kept disjoint sets: nobody is trusted, the model stays
            return Aggregate(updates.new_zeros(updates.shape[1]), updates.new_zeros(len(updates)))
        return Aggregate(updates[chosen].mean(0), equal_weights(updates, chosen))
