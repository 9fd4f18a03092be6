"""Neurotoxin (Zhang, Panda, Song, Yang, Mahoney, Gonzalez, Ramchandran & Mittal, "Neurotoxin: durable
backdoors in federated learning", ICML 2022).

The malicious users train on BadNets-poisoned data (the ``backdoor`` attack's trigger, this section's
``trigger_size`` and ``poisoned_fraction``; boosted by ``attack.boost`` as ``backdoor``) and upload
their update confined to the coordinates the honest users change least. The attacker estimates the
benign direction by the last round's global step ``s`` (what the global model moved by, after the
server's optimiser: ``RoundUpdates.last_step``) and zeroes its update on the ``round(mask_ratio * P)``
coordinates of the largest ``|s|`` (ties: the lower index first), keeping it unchanged on the others.
A backdoor written where the benign users hardly move the model is not overwritten by their later
rounds: the paper's durability.

Choices and deviations:

- the projection is applied to the upload, once per round, not to every local step (the paper's
  projected gradient descent). For plain SGD the two are the same for one local step
  (``training.algorithm: fedsgd``, or a single batch): the upload is ``-lr * mask * g`` either way.
  With several steps they differ at second order: the unprojected path also moves the masked
  coordinates, so the later gradients on the kept ones are taken at another point. The upload is
  exactly zero on the masked coordinates in both; projecting every step would put the mask inside
  the users' shared batched training (``pipeline.core.local_training``), which every user runs;
- round 1 has no last step (nor has a round after a recovery to the initial model): the attacker
  then uploads its update unmasked, the plain BadNets round (the paper's attacker joins a model that
  has already trained, so it always has one);
- the default ``mask_ratio`` is 0.05, the top 5% masked: the paper's released code runs Neurotoxin
  keeping the 95% least-changed coordinates (its ``gradmask_ratio 0.95``; this reading is from
  memory of that code, the paper's ablations vary the share). Its estimate there is the gradient of
  the attacker's clean data at the global model; the paper's text, and this module, use the last
  global step instead, which needs no clean data;
- the paper also bounds the attacker's update norm (its PGD baseline's projection onto a ball);
  not here: a norm bound is a defense of this package (the ``norm_clipping`` arm), and the attack
  measured against it there;
- the attackers poison in every round, not only in an attack window followed by benign rounds (the
  paper's durability experiment): the attack arm measures the backdoor after the same rounds as
  the other backdoors.

Parameters (``attack.neurotoxin``): ``trigger_size`` >= 1, smaller than the images (default 4),
``poisoned_fraction`` in (0, 1] (0.5), ``mask_ratio`` in [0, 1) (0.05; 0: the boosted BadNets upload); and
the shared ``attack.target_class``, ``attack.boost``, ``attack.malicious_epochs``, ``attack.malicious_lr_multiplier``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.backdoor import Backdoor, BackdoorParams
from pipeline.attacks.base import RoundUpdates, check, finite_number


def masked_coordinates(last_step: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Bool (P,): the ``round(mask_ratio * P)`` coordinates of the largest ``|last_step|``; ties go to the
    lower index (a stable sort: the same coordinates on every device)."""
    count = round(mask_ratio * last_step.numel())
    order = torch.sort(last_step.abs(), descending=True, stable=True).indices
    masked = torch.zeros(last_step.numel(), dtype=torch.bool, device=last_step.device)
    masked[order[:count]] = True
    return masked


def neurotoxin_uploads(own: torch.Tensor, last_step: torch.Tensor | None, mask_ratio: float) -> torch.Tensor:
    """The attackers' updates (attackers, P) set to zero on the masked coordinates of ``last_step``;
    unchanged when there is no last step (round 1)."""
    if last_step is None:
        return own
    masked = masked_coordinates(last_step.to(own.device), mask_ratio)
    return torch.where(masked, torch.zeros((), dtype=own.dtype, device=own.device), own)


@dataclass
class NeurotoxinParams(BackdoorParams):
    mask_ratio: float = 0.05  # share of the coordinates masked: the largest |last global step|

    def validate(self, key: str) -> None:
        super().validate(key)
        check(finite_number(self.mask_ratio) and 0 <= self.mask_ratio < 1, f"{key}.mask_ratio",
              "must be in [0, 1) (1 would upload nothing)", self.mask_ratio)


@register
class Neurotoxin(Backdoor):
    """A BadNets backdoor uploaded only on the coordinates the last global step moved least."""

    name = "neurotoxin"
    summary = "backdoor confined to the coordinates the last global step moved least (Zhang et al. 2022)"
    Params = NeurotoxinParams
    needs_last_step = True
    search_ranges = {
        "attack.neurotoxin.mask_ratio": (0.01, 0.5, True, False),
        "attack.neurotoxin.poisoned_fraction": (0.1, 1.0, False, False),
        "attack.boost": (1.0, 10.0, True, False),
        "attack.malicious_epochs": (1, 5, False, True),
    }

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        return neurotoxin_uploads(updates.own, updates.last_step, self.params.mask_ratio)
