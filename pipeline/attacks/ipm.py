"""Inner-product manipulation (Xie, Koyejo & Gupta, "Fall of empires: breaking Byzantine-tolerant
SGD by inner product manipulation", UAI 2020).

Every malicious user uploads ``-epsilon`` times the mean of the honest updates
(omniscient), so that the aggregate's inner product with the true gradient turns
negative when it passes a robust rule. Untargeted: success is the accuracy drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import ACCURACY_DROP, Attack, AttackParams, RoundUpdates, check, everyone_uploads, \
    finite_number


def ipm_update(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``-epsilon * mean(honest)``, shape (P,)."""
    return -epsilon * honest.mean(0)


@dataclass
class IpmParams(AttackParams):
    epsilon: float = 0.5  # the scale of the reversed honest mean (Xie et al.: 0.1 against Krum, larger vs median)

    def validate(self, key: str) -> None:
        check(finite_number(self.epsilon) and self.epsilon > 0, f"{key}.epsilon", "must be a finite number > 0",
              self.epsilon)


@register
class Ipm(Attack):
    """Omniscient and untargeted: the honest mean, reversed and scaled."""

    name = "ipm"
    summary = "inner-product manipulation: -epsilon x the honest mean (Xie et al. 2020); untargeted"
    Params = IpmParams
    omniscient = True
    trains_maliciously = False
    success_metric = ACCURACY_DROP
    search_ranges = {"attack.ipm.epsilon": (0.05, 20.0, True, False)}

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        return everyone_uploads(ipm_update(updates.honest, self.params.epsilon), updates.own)
