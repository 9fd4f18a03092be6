"""Targeted label flipping (the AUROR paper's attack, Shen, Tople & Saxena, ACSAC 2016, Sec. 2):
each malicious user relabels ``attack.poisoned_fraction`` of its source-class samples
as the target class, trains on them (``attack.malicious_epochs``, ``attack.malicious_lr_multiplier``)
and uploads its update multiplied by ``attack.boost``."""

from __future__ import annotations

import numpy as np
from pipeline.lazy import torch

from datamodules.users import poison_targeted
from pipeline.attacks import register
from pipeline.attacks.base import Attack, Poisoned, UserData


def flip_labels(data: UserData, source: int, target: int, fraction: float, rng: np.random.Generator) -> Poisoned:
    """:func:`datamodules.users.poison_targeted` on the users' data."""
    labels, flipped = poison_targeted(data.y.numpy(), [i.numpy() for i in data.user_indices], data.malicious.numpy(),
                                      source, target, fraction, rng)
    return Poisoned(data.x, torch.as_tensor(labels), torch.as_tensor(flipped))


@register
class LabelFlip(Attack):
    """Source -> target relabelling of the malicious users' own data; success: the source -> target rate."""

    name = "label_flip"
    summary = "targeted label flipping, source -> target, boosted (the AUROR paper's attack)"
    boosted = True
    search_ranges = {
        "attack.poisoned_fraction": (0.1, 1.0, False, False),
        "attack.boost": (1.0, 10.0, True, False),
        "attack.malicious_epochs": (1, 5, False, True),
        "attack.malicious_lr_multiplier": (0.5, 4.0, True, False),
    }

    def poison_data(self, data: UserData, rng: np.random.Generator) -> Poisoned:
        s = self.settings
        return flip_labels(data, s.source_class, s.target_class, s.poisoned_fraction, rng)
