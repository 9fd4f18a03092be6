"""Min-Sum (Shejwalkar & Houmansadr, "Manipulating the Byzantine: optimizing model poisoning
attacks and defenses for federated learning", NDSS 2021, Algorithm 1 with the Min-Sum objective).

Every malicious user uploads ``m = mean + gamma * p`` of the honest updates ``h_i``, with the
perturbation ``p`` of :mod:`pipeline.attacks.min_max` (``-std``, ``-mean / ||mean||`` or
``-sign(mean)``), and ``gamma`` the largest value found by the same bisection (from ``gamma_init``, to
``tolerance``) for which the crafted update's sum of squared distances to the honest updates stays
within the largest such sum of one honest update:

    sum_i ||m - h_i||^2 <= max_j sum_i ||h_j - h_i||^2.

Min-Max bounds the crafted update's largest distance; Min-Sum its total, which is what distance-sum
rules (Krum's score, Bulyan) look at. Since ``sum_i (mean - h_i) = 0`` the left side is
``sum_i ||mean - h_i||^2 + n gamma^2 ||p||^2``, so the condition holds exactly for
``gamma <= max_j ||h_j - mean|| / ||p||``: the bisection approaches that bound from below (to
``tolerance``, and at most ``2 * gamma_init``, where Algorithm 1's search stops). We keep the
paper's bisection rather than the closed form so that Min-Max and Min-Sum share one search (and
``gamma_init`` / ``tolerance`` mean the same in both); the tests check it against the closed form.

Deviations: none in the rule. The distances are summed in float64 (the honest updates' pairwise
squared distances as :func:`pipeline.defenses.krum.pairwise_sq_distances` computes them) so that the
comparison does not depend on the updates' dtype. The paper's default perturbation varies by
experiment; ours is ``std``, as Min-Max's. Omniscient and untargeted: success is the accuracy drop.

Parameters (``attack.min_sum``): ``perturbation`` (std | unit | sign, default std), ``gamma_init``
(the bisection's first gamma, default 10), ``tolerance`` (the bisection stops when gamma moves less,
default 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import ACCURACY_DROP, Attack, RoundUpdates, everyone_uploads
from pipeline.attacks.min_max import MinMaxParams, bisect_gamma, perturbation
from pipeline.defenses.krum import pairwise_sq_distances


def min_sum_update(honest: torch.Tensor, kind: str, gamma_init: float, tolerance: float) -> tuple[torch.Tensor, float]:
    """The crafted update (P,) and its ``gamma``: Algorithm 1's bisection with the Min-Sum condition
    ``sum_i ||m - h_i||^2 <= max_j sum_i ||h_j - h_i||^2``."""
    mean = honest.mean(0)
    p = perturbation(honest, kind)
    bound = pairwise_sq_distances(honest).sum(1).max()
    wide = honest.double()

    def fits(gamma: float) -> bool:
        return bool((wide - (mean + gamma * p).double()).square().sum() <= bound)

    best = bisect_gamma(fits, gamma_init, tolerance)
    return mean + best * p, best


@dataclass
class MinSumParams(MinMaxParams):
    """Min-Max's parameters (``perturbation``, ``gamma_init``, ``tolerance``) and their validation."""


@register
class MinSum(Attack):
    """Omniscient and untargeted: as far from the honest mean as the honest updates' distance sums allow."""

    name = "min_sum"
    summary = ("Min-Sum: honest mean + the largest gamma x perturbation whose distance sum to the honest updates "
               "stays within theirs (NDSS 2021)")
    Params = MinSumParams
    omniscient = True
    trains_maliciously = False
    success_metric = ACCURACY_DROP
    search_ranges = {"attack.min_sum.gamma_init": (1.0, 100.0, True, False)}

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        crafted, _ = min_sum_update(updates.honest, self.params.perturbation, self.params.gamma_init,
                                    self.params.tolerance)
        return everyone_uploads(crafted, updates.own)
