"""Mimic (Karimireddy, He & Jaggi, "Byzantine-robust learning on heterogeneous datasets via
bucketing", ICLR 2022, Section 3).

Every malicious user uploads one honest user's update of the round (omniscient): under
heterogeneous data, the rule then over-weighs that user's data, and nothing in the uploads stands
out (each is an honest update). The mimicked user is the honest participant of rank ``target`` in
id order (wrapping around when the round has fewer); byzfl's ``Mimic(epsilon=target)`` (tested
equal). Untargeted: success is the accuracy drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import ACCURACY_DROP, Attack, AttackParams, RoundUpdates, check, everyone_uploads, \
    whole_number


@dataclass
class MimicParams(AttackParams):
    target: int = 0  # the mimicked honest user's rank among the round's honest participants

    def validate(self, key: str) -> None:
        check(whole_number(self.target) and self.target >= 0,
              f"{key}.target", "must be an integer >= 0", self.target)


@register
class Mimic(Attack):
    """Every attacker copies one honest user's update."""

    name = "mimic"
    summary = "mimic: every attacker uploads one honest user's update (Karimireddy et al. 2022); untargeted"
    Params = MimicParams
    omniscient = True
    trains_maliciously = False
    success_metric = ACCURACY_DROP

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        return everyone_uploads(updates.honest[self.params.target % len(updates.honest)], updates.own)
