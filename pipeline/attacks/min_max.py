"""Min-Max (Shejwalkar & Houmansadr, "Manipulating the Byzantine: optimizing model poisoning
attacks and defenses for federated learning", NDSS 2021, Algorithm 1).

Every malicious user uploads ``mean + gamma * p`` of the honest updates, where the
perturbation ``p`` is ``-std`` (``perturbation: std``), ``-mean / ||mean||``
(``unit``) or ``-sign(mean)`` (``sign``), and ``gamma`` is the largest value
(found by bisection from ``gamma_init``, to ``tolerance``) for which the crafted
update's largest distance to an honest update stays within the largest distance
between two honest updates. Omniscient and untargeted: success is the accuracy drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import ACCURACY_DROP, Attack, AttackParams, RoundUpdates, check, everyone_uploads, \
    finite_number, honest_spread

PERTURBATIONS = ("std", "unit", "sign")


def perturbation(honest: torch.Tensor, kind: str) -> torch.Tensor:
    mean, std = honest_spread(honest)
    if kind == "std":
        return -std
    if kind == "sign":
        return -torch.sign(mean)
    return -mean / mean.norm().clamp_min(1e-12)


def bisect_gamma(fits: Callable[[float], bool], gamma_init: float, tolerance: float) -> float:
    """Algorithm 1's search: the largest ``gamma`` found with ``fits(gamma)`` (0.0 when none), trying
    ``gamma_init`` first, then up after a fit and down after a miss by a step halved every try, until the
    next try is within ``tolerance`` of the best (so never above ``2 * gamma_init``). Min-Max and Min-Sum differ
    only in ``fits``."""
    gamma, step, best = gamma_init, gamma_init / 2, 0.0
    while abs(best - gamma) > tolerance:
        if fits(gamma):
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return best


def min_max_update(honest: torch.Tensor, kind: str, gamma_init: float, tolerance: float) -> tuple[torch.Tensor, float]:
    """The crafted update (P,) and its ``gamma``: Algorithm 1's bisection with the Min-Max condition
    ``max_i ||m - h_i|| <= max_ij ||h_i - h_j||``."""
    mean = honest.mean(0)
    p = perturbation(honest, kind)
    bound = torch.cdist(honest, honest).max()
    best = bisect_gamma(lambda gamma: bool((honest - (mean + gamma * p)).norm(dim=1).max() <= bound),
                        gamma_init, tolerance)
    return mean + best * p, best


@dataclass
class MinMaxParams(AttackParams):
    perturbation: str = "std"  # std | unit | sign
    gamma_init: float = 10.0  # the bisection's first gamma
    tolerance: float = 1e-5  # the bisection stops when gamma moves less than this

    def validate(self, key: str) -> None:
        check(self.perturbation in PERTURBATIONS, f"{key}.perturbation", f"must be one of {', '.join(PERTURBATIONS)}",
              self.perturbation)
        check(finite_number(self.gamma_init) and self.gamma_init > 0, f"{key}.gamma_init",
              "must be a finite number > 0", self.gamma_init)
        check(finite_number(self.tolerance) and self.tolerance > 0, f"{key}.tolerance",
              "must be a finite number > 0", self.tolerance)


@register
class MinMax(Attack):
    """Omniscient and untargeted: as far from the honest mean as the honest updates are from each other."""

    name = "min_max"
    summary = "Min-Max: honest mean + the largest gamma x perturbation within the honest spread (NDSS 2021)"
    Params = MinMaxParams
    omniscient = True
    trains_maliciously = False
    success_metric = ACCURACY_DROP
    search_ranges = {"attack.min_max.gamma_init": (1.0, 100.0, True, False)}

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        crafted, _ = min_max_update(updates.honest, self.params.perturbation, self.params.gamma_init,
                                    self.params.tolerance)
        return everyone_uploads(crafted, updates.own)
