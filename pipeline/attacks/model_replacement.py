"""Model replacement, constrain-and-scale (Bagdasaryan, Veit, Hua, Estrin & Shmatikov,
"How to backdoor federated learning", AISTATS 2020).

The malicious users train on backdoored data (the ``backdoor`` attack's trigger,
this section's ``trigger_size`` and ``poisoned_fraction``) and scale their update
by ``gamma = users / attackers`` (``scale: 0``; Sec. 3.2 with the server's
learning rate 1: the mean of the round then moves the global model onto the
attackers' backdoored model) or by ``scale`` when given. ``anomaly_weight`` > 0
adds the paper's anomaly-loss term: each attacker minimises
``(1 - w) * L_class + w * ||theta - theta_global||^2``, the distance to the
global model being the anomaly score of norm- and distance-based defenses
(Sec. 3.3, "constrain").
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.backdoor import Backdoor, BackdoorParams
from pipeline.attacks.base import RoundUpdates, check, finite_number


@dataclass
class ModelReplacementParams(BackdoorParams):
    scale: float = 0.0  # gamma; 0: users / attackers (replace the global model)
    anomaly_weight: float = 0.0  # w of the anomaly loss; 0: plain train-and-scale

    def validate(self, key: str) -> None:
        super().validate(key)
        check(finite_number(self.scale) and self.scale >= 0, f"{key}.scale",
              "must be a finite number >= 0 (0: users / attackers)", self.scale)
        check(finite_number(self.anomaly_weight) and 0 <= self.anomaly_weight < 1, f"{key}.anomaly_weight",
              "must be in [0, 1)", self.anomaly_weight)


@register
class ModelReplacement(Backdoor):
    """A backdoor update scaled to replace the global model, optionally constrained by an anomaly loss."""

    name = "model_replacement"
    summary = "backdoor scaled by users / attackers to replace the global model (Bagdasaryan et al. 2020)"
    Params = ModelReplacementParams
    boosted = False
    search_ranges = {
        "attack.model_replacement.scale": (1.0, 30.0, True, False),
        "attack.model_replacement.anomaly_weight": (0.0, 0.9, False, False),
        "attack.model_replacement.poisoned_fraction": (0.1, 1.0, False, False),
    }

    def anomaly_weight(self) -> float:
        return self.params.anomaly_weight

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        gamma = self.params.scale or updates.num_users / updates.own.shape[0]
        return updates.own * gamma
