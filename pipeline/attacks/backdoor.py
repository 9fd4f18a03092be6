"""Backdoor with a pixel-pattern trigger (BadNets: Gu, Dolan-Gavitt & Garg, "BadNets:
identifying vulnerabilities in the machine learning model supply chain", 2017).

Each malicious user stamps a white square (``trigger_size`` pixels a side, in the
bottom-right corner, at the brightest value of the training data in each channel) on
``poisoned_fraction`` of its samples, chosen at random, and relabels them as
``attack.target_class``. Success: the fraction of the test inputs of the other
classes that the global model classifies as the target once the trigger is
stamped on them (on a copy: the clean evaluation never sees the trigger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import BACKDOOR, Attack, AttackParams, Poisoned, Predict, UserData, check


def image_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (samples, channels, height, width): flat square images as one channel."""
    if x.dim() == 4:
        return x
    side = math.isqrt(x[0].numel())
    if side * side != x[0].numel():
        raise ValueError(f"cannot stamp a trigger on inputs of shape {tuple(x.shape[1:])} (not square images)")
    return x.reshape(len(x), 1, side, side)


def trigger_value(train_x: torch.Tensor) -> torch.Tensor:
    """The brightest value of each channel of the training inputs, shape (channels,)."""
    return image_view(train_x).amax(dim=(0, 2, 3))


def stamp_trigger(x: torch.Tensor, size: int, value: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with a ``size`` x ``size`` square set to ``value`` (per channel) in the
    bottom-right corner of every image; same shape as ``x``."""
    stamped = image_view(x.clone())
    stamped[:, :, -size:, -size:] = value.to(x.dtype).view(1, -1, 1, 1)
    return stamped.reshape(x.shape)


def image_side(dataset: str) -> int:
    """The side in pixels of ``dataset``'s square images (``data.name``): what a trigger must fit in."""
    from pipeline.experiment.config import DATASET_IMAGES  # imported here: the config imports this package

    return DATASET_IMAGES[dataset][-1]


def stamp_pattern(x: torch.Tensor, pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with the pixels where ``pattern`` is True set to ``value`` (per channel); ``pattern``
    is bool (height, width), one for every image, or (samples, height, width), one per image."""
    images = image_view(x)
    mask = pattern.to(x.device).view(-1, 1, *images.shape[-2:])  # (1 or samples, 1, H, W): every channel
    return torch.where(mask, value.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1), images).reshape(x.shape)


def chosen_samples(data: UserData, fraction: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each malicious user's ``round(fraction * n)`` samples (of its ``n``, at random, rows of ``data.x``),
    one array per malicious user in id order."""
    return [rng.choice(data.user_indices[u].numpy(), size=round(fraction * len(data.user_indices[u])),
                       replace=False) for u in data.malicious.nonzero().flatten().tolist()]


def relabelled(data: UserData, rows: torch.Tensor, stamped: torch.Tensor, target: int) -> Poisoned:
    """The users' data with the samples ``rows`` replaced by ``stamped`` and labelled ``target``."""
    x, y = data.x.clone(), data.y.clone()
    x[rows] = stamped
    y[rows] = target
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[rows] = True
    return Poisoned(x, y, poisoned)


def stamp_users(data: UserData, size: int, value: torch.Tensor, target: int, fraction: float,
                rng: np.random.Generator) -> Poisoned:
    """Each malicious user's ``round(fraction * n)`` samples (of its ``n``, at random) triggered and labelled ``target``."""
    chosen = chosen_samples(data, fraction, rng)
    rows = torch.as_tensor(np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)).long()
    return relabelled(data, rows, stamp_trigger(data.x[rows], size, value), target)


def triggered_success(predict: Predict, x: torch.Tensor, y: torch.Tensor, target: int,
                      stamp: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Fraction of the non-target inputs classified as ``target`` once ``stamp`` (a copy) triggered them."""
    others = y != target
    return (predict(stamp(x[others])) == target).float().mean().item()


def backdoor_success(predict: Predict, x: torch.Tensor, y: torch.Tensor, size: int, value: torch.Tensor,
                     target: int) -> float:
    """Fraction of the non-target inputs classified as ``target`` once triggered."""
    return triggered_success(predict, x, y, target, lambda inputs: stamp_trigger(inputs, size, value))


@dataclass
class BackdoorParams(AttackParams):
    trigger_size: int = 4  # side of the square trigger, in pixels
    poisoned_fraction: float = 0.5  # share of each malicious user's samples triggered and relabelled

    def validate(self, key: str) -> None:
        check(self.trigger_size >= 1, f"{key}.trigger_size", "must be >= 1", self.trigger_size)
        check(0 < self.poisoned_fraction <= 1, f"{key}.poisoned_fraction", "must be in (0, 1]",
              self.poisoned_fraction)


@register
class Backdoor(Attack):
    """BadNets: trigger + target label on part of the malicious users' data; boosted like label flipping."""

    name = "backdoor"
    summary = "BadNets pixel-square trigger relabelled as the target class (Gu et al. 2017)"
    Params = BackdoorParams
    success_metric = BACKDOOR
    boosted = True
    search_ranges = {
        "attack.backdoor.poisoned_fraction": (0.1, 1.0, False, False),
        "attack.boost": (1.0, 10.0, True, False),
        "attack.malicious_epochs": (1, 5, False, True),
    }

    def success_definition(self) -> str:
        return f"{BACKDOOR} -> {self.settings.target_class}, trigger {self.params.trigger_size}"

    def setup(self, train_x: torch.Tensor) -> None:
        self.value = trigger_value(train_x)

    def poison_data(self, data: UserData, rng: np.random.Generator) -> Poisoned:
        return stamp_users(data, self.params.trigger_size, self.value, self.settings.target_class,
                           self.params.poisoned_fraction, rng)

    def success_rate(self, predict: Predict, x: torch.Tensor, y: torch.Tensor, predicted: torch.Tensor) -> float:
        return backdoor_success(predict, x, y, self.params.trigger_size, self.value.to(x.device),
                                self.settings.target_class)

    @classmethod
    def check_config(cls, params, cfg, key: str) -> None:
        side = image_side(cfg.data.name)
        check(params.trigger_size < side, f"{key}.trigger_size", f"must be smaller than {cfg.data.name}'s "
              f"{side}-pixel images", params.trigger_size)
