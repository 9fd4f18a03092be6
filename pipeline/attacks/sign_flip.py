"""Sign flipping (Li, Xu, Chen, Giannakis & Ling, "RSA: Byzantine-robust stochastic aggregation
methods for distributed learning from heterogeneous datasets", AAAI 2019).

Every malicious user trains as an honest one, then uploads its own update reversed and scaled,
``-scale x update``: it pushes the model uphill on its own clean data. Not omniscient (byzfl's
``SignFlipping`` reverses the mean of the vectors it is given: given one user's update, the same).
Untargeted: success is the accuracy drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import ACCURACY_DROP, Attack, AttackParams, RoundUpdates, check, finite_number


@dataclass
class SignFlipParams(AttackParams):
    scale: float = 1.0  # the reversed update's length, in multiples of the attacker's own

    def validate(self, key: str) -> None:
        check(finite_number(self.scale) and self.scale > 0, f"{key}.scale", "must be a finite number > 0", self.scale)


@register
class SignFlip(Attack):
    """Each attacker's own clean update, reversed and scaled."""

    name = "sign_flip"
    summary = "sign flipping: each attacker uploads -scale x its own clean update (Li et al. 2019); untargeted"
    Params = SignFlipParams
    trains_maliciously = False
    success_metric = ACCURACY_DROP
    search_ranges = {"attack.sign_flip.scale": (0.1, 20.0, True, False)}

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        return -self.params.scale * updates.own
