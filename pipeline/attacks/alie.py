"""A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019).

Every malicious user uploads ``mean - z * std`` of the honest updates, per
coordinate (omniscient). ``z: 0`` takes the paper's ``z_max``: with ``n`` users
and ``m`` attackers, ``s = floor(n / 2 + 1) - m`` honest users must be won over,
and ``z_max = Phi^-1((n - s) / n)`` (Sec. 3.3). ``variant: untargeted`` is the
convergence attack (success: the accuracy drop); ``variant: backdoor`` trains on
the ``backdoor`` attack's triggered data and clips the update into
``mean +- z * std`` of the honest ones, coordinate by coordinate (Sec. 4, with the
clip in place of the paper's loss term; success: the backdoor rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.backdoor import Backdoor, BackdoorParams
from pipeline.attacks.base import ACCURACY_DROP, BACKDOOR, Poisoned, RoundUpdates, UserData, check, everyone_uploads, \
    finite_number, honest_spread

VARIANTS = ("untargeted", "backdoor")


def z_max(num_users: int, num_attackers: int) -> float:
    """The largest z for which the crafted value still has a majority of users on its side. When the attackers
    alone are a majority (a sampled round can hold more than their share), one honest user is still won over."""
    s = max(1, math.floor(num_users / 2 + 1) - num_attackers)
    share = (num_users - s) / num_users
    return NormalDist().inv_cdf(share) if share > 0 else 0.0


def alie_update(honest: torch.Tensor, z: float) -> torch.Tensor:
    """``mean - z * std`` of the honest updates (P,)."""
    mean, std = honest_spread(honest)
    return mean - z * std


@dataclass
class AlieParams(BackdoorParams):
    z: float = 0.0  # deviation in honest standard deviations; 0: z_max from the numbers of users
    variant: str = "untargeted"  # untargeted | backdoor

    def validate(self, key: str) -> None:
        super().validate(key)
        check(finite_number(self.z) and self.z >= 0, f"{key}.z", "must be a finite number >= 0 (0: z_max)", self.z)
        check(self.variant in VARIANTS, f"{key}.variant", f"must be one of {', '.join(VARIANTS)}", self.variant)


@register
class Alie(Backdoor):
    """Omniscient: every upload sits ``z`` honest standard deviations from the honest mean."""

    name = "alie"
    summary = "A Little Is Enough: mean - z std of the honest updates (Baruch et al. 2019); untargeted or backdoor"
    Params = AlieParams
    omniscient = True
    trains_maliciously = False
    boosted = False
    search_ranges = {"attack.alie.z": (0.1, 3.0, False, False)}

    @property
    def success_metric(self) -> str:
        return BACKDOOR if self.params.variant == "backdoor" else ACCURACY_DROP

    def success_definition(self) -> str:
        return super().success_definition() if self.params.variant == "backdoor" else ACCURACY_DROP

    def poison_data(self, data: UserData, rng: np.random.Generator) -> Poisoned:
        if self.params.variant == "backdoor":
            return super().poison_data(data, rng)
        return Poisoned(data.x, data.y, torch.zeros(len(data.y), dtype=torch.bool))

    def success_rate(self, predict, x, y, predicted) -> float | None:
        return super().success_rate(predict, x, y, predicted) if self.params.variant == "backdoor" else None

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        z = self.params.z or z_max(updates.num_users, updates.own.shape[0])
        mean, std = honest_spread(updates.honest)
        if self.params.variant == "backdoor":
            return torch.minimum(torch.maximum(updates.own, mean - z * std), mean + z * std)
        return everyone_uploads(mean - z * std, updates.own)
