"""The attack interface: what the malicious users train on, and what they upload.

An attack acts at two explicit points of a run:

- :meth:`Attack.poison_data` (data side, once, before training): the
  malicious users' training data, e.g. relabelled or stamped with a trigger;
- :meth:`Attack.craft` (update side, every round, after local training and
  before the upload): the malicious users' own updates in, their uploads
  out. An attack declared ``omniscient`` also receives the honest users'
  updates of that round; any other attack receives ``None`` there.

Each attack owns its parameters (a dataclass validating itself, the config
section ``attack.<name>``) and its success metric (:meth:`Attack.success_rate`).
The settings every attack shares (source and target class, the attackers'
local training) stay in the ``attack`` section itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from pipeline.lazy import torch

from pipeline.core.metrics import attack_success_rate
from pipeline.core.server import RoundUpdates
from pipeline.defenses.base import check, finite_number, whole_number

__all__ = ["Attack", "AttackParams", "Poisoned", "RoundUpdates", "UserData", "check", "finite_number", "whole_number"]

# how an attack's success is measured (the MLflow tag ``attack.success_metric``)
SOURCE_TO_TARGET = "source_to_target"  # fraction of source-class test inputs classified as the target
BACKDOOR = "backdoor"  # fraction of triggered test inputs of other classes classified as the target
ACCURACY_DROP = "accuracy_drop"  # untargeted: the benign arm's accuracy minus this arm's


@dataclasses.dataclass
class AttackParams:
    """Base of an attack's parameters (subclass it as a dataclass)."""

    # fields added after results were recorded, with the values that behave as before they existed: while
    # every one holds that value they are left out of a cell's key (grid.cell_config), so the recorded
    # results of the same behaviour are still found; any other value keys them all
    unkeyed_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, key: str) -> None:
        """Raise :class:`ConfigError` naming ``key.<field>`` for a bad value; ``key`` is ``attack.<name>``.
        NaN and +-inf in a float field are refused after it, for every plug-in (``check_finite_fields``)."""


@dataclass(frozen=True)
class UserData:
    """The users' training data, as the data module holds it (on the CPU)."""

    x: torch.Tensor  # (samples, ...): the union of the users' inputs
    y: torch.Tensor  # (samples,): their labels
    user_indices: list[torch.Tensor]  # one index tensor into x per user
    malicious: torch.Tensor  # bool (users,)


@dataclass(frozen=True)
class Poisoned:
    """What :meth:`Attack.poison_data` returns: the data as the users now hold it."""

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor  # bool (samples,): the samples the attack changed


Predict = Callable[["torch.Tensor"], "torch.Tensor"]  # inputs -> predicted classes of the global model


class Attack:
    """Base class of the attacks.

    Class attributes an attack sets:

    - ``name``: its registry name (``attack.name`` and the config section ``attack.<name>``);
    - ``summary``: one line for ``auror attacks``;
    - ``Params``: its parameters dataclass (an :class:`AttackParams`);
    - ``success_metric``: :data:`SOURCE_TO_TARGET` (default), :data:`BACKDOOR` or :data:`ACCURACY_DROP`;
    - ``omniscient``: :meth:`craft` receives the honest users' updates of the round;
    - ``trains_maliciously``: the attackers train with ``attack.malicious_epochs`` and
      ``attack.malicious_lr_multiplier`` (else as honest users do);
    - ``boosted``: the attackers' updates are multiplied by ``attack.boost`` before :meth:`craft`;
    - ``needs_last_step``: :meth:`craft` receives the previous round's global step
      (``RoundUpdates.last_step``, ``None`` in round 1); the loop keeps it (and checkpoints it) only then;
    - ``search_ranges``: what ``auror tune --kind attack`` searches: config key ->
      ``(low, high, log scale, integer)``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[AttackParams]] = AttackParams
    success_metric: ClassVar[str] = SOURCE_TO_TARGET
    omniscient: ClassVar[bool] = False
    trains_maliciously: ClassVar[bool] = True
    boosted: ClassVar[bool] = False
    needs_last_step: ClassVar[bool] = False
    search_ranges: ClassVar[dict[str, tuple[float, float, bool, bool]]] = {}

    def __init__(self, params: AttackParams, settings: Any) -> None:
        self.params = params
        self.settings = settings  # the config's attack section (source_class, target_class, ...)

    def success_definition(self) -> str:
        """What the success metric depends on (runs with equal definitions measure the same thing)."""
        if self.success_metric == ACCURACY_DROP:
            return ACCURACY_DROP
        return f"{self.success_metric} {self.settings.source_class} -> {self.settings.target_class}"

    def anomaly_weight(self) -> float:
        """``w`` of an anomaly term ``w ||theta - theta_global||^2`` in the attackers' local loss (0: none)."""
        return 0.0

    def setup(self, train_x: torch.Tensor) -> None:
        """Called once per arm with the clean training inputs, before anything else (a trigger's value)."""

    def poison_data(self, data: UserData, rng: np.random.Generator) -> Poisoned:
        """The data side: the users' data with the malicious users' share changed. Default: unchanged."""
        return Poisoned(data.x, data.y, torch.zeros(len(data.y), dtype=torch.bool))

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        """The update side: the malicious users' uploads, (attackers, P). Default: their own updates."""
        return updates.own

    def success_rate(self, predict: Predict, x: torch.Tensor, y: torch.Tensor,
                     predicted: torch.Tensor) -> float | None:
        """The attack's success on the test set (``predicted``: the global model's classes of ``x``);
        ``None`` for an untargeted attack (its success is the accuracy drop against the benign arm)."""
        if self.success_metric == ACCURACY_DROP:
            return None
        return attack_success_rate(predicted, y, self.settings.source_class, self.settings.target_class)

    @classmethod
    def check_config(cls, params: AttackParams, cfg, key: str) -> None:
        """Rules across config sections, after ``params.validate(key)``."""

    @classmethod
    def search_space(cls, trial, cfg) -> list[str]:
        """An Optuna trial's choice of ``search_ranges``, as ``--set`` overrides."""
        overrides = []
        for key, (low, high, log, integer) in cls.search_ranges.items():
            value = (trial.suggest_int(key, int(low), int(high), log=log) if integer
                     else trial.suggest_float(key, low, high, log=log))
            overrides.append(f"{key}={value!r}")
        return overrides

    @classmethod
    def warmup_rounds(cls, cfg) -> int:
        """Rounds before which an attack study must not prune a trial (an attack that waits)."""
        return 1


def everyone_uploads(upload: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``upload`` (P,) as every attacker's row, shaped like ``own`` (attackers, P)."""
    return upload.expand_as(own).clone()


def honest_spread(honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and standard deviation (ddof 1, as ALIE and byzfl) of the honest updates."""
    if honest.shape[0] < 2:
        return honest.mean(0), torch.zeros_like(honest[0])
    return honest.mean(0), honest.std(0, correction=1)
