"""What an Optuna study of ``auror tune`` optimises: the objectives (pure functions of an arm's
metrics), the search spaces as config overrides, and the per-round report that prunes a trial."""

from __future__ import annotations

import math

import optuna

from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.core.loop import Callback, CollaborativeLoop
from pipeline.core.metrics import accuracy_drop, attack_success, defense_detection_rates
from pipeline.defenses.compose import defense_class, defense_params
from pipeline.experiment.config import Config


def defense_objective(detection_rate: float, false_positive_rate: float, attack_success_rate: float,
                      accuracy_drop: float) -> float:
    """DR - FPR - SR - max(AD, 0): 1 is perfect; a defense gains nothing from beating the benign model."""
    return detection_rate - false_positive_rate - attack_success_rate - max(accuracy_drop, 0.0)


def objective_value(kind: str, metrics: dict[str, float | None]) -> float:
    if kind == "attack":
        return attack_success(metrics["attack_success_rate"], metrics["accuracy_drop"])
    # a rule that flags nobody (median, trimmed mean...) has DR = FPR = None: they count 0
    return defense_objective(metrics["detection_rate"] or 0.0, metrics["false_positive_rate"] or 0.0,
                             metrics["attack_success_rate"], metrics["accuracy_drop"])


def max_malicious_users(cfg: Config, budget: float) -> int:
    """The most malicious users within ``budget`` (a fraction of the users)."""
    return math.floor(budget * cfg.users.num_users + 1e-9)


def suggest_attack(trial: optuna.Trial, cfg: Config, budget: float | None) -> list[str]:
    """The configured attack's search space and the number of malicious users (up to ``budget``; None: the
    configured users, not searched), as overrides."""
    overrides = ATTACKS[cfg.attack.name].search_space(trial, cfg)
    if budget is None:
        return overrides
    users = trial.suggest_int("users.malicious_users", 1, max_malicious_users(cfg, budget))
    return [*overrides, f"users.malicious_fraction={users / cfg.users.num_users!r}"]


def suggest(kind: str, defense: str, trial: optuna.Trial, cfg: Config, budget: float | None) -> list[str]:
    """A trial's parameters as config overrides: the defense's own search space, or the attack's."""
    if kind == "defense":
        return defense_class(defense).search_space(trial, cfg)
    return suggest_attack(trial, cfg, budget)


def warmup_rounds(kind: str, defense: str, cfg: Config) -> int:
    """No pruning before detection can have happened (for AUROR: the largest window searched, or the configured one)."""
    cls, params = defense_class(defense), defense_params(cfg.defense, defense)
    if kind == "defense":
        return cls.warmup_rounds(params, cfg)
    return max(getattr(params, "window_rounds", 1), ATTACKS[cfg.attack.name].warmup_rounds(cfg))


class TrialReporter(Callback):
    """Reports every round's objective to the trial; raises ``TrialPruned`` when the pruner says so.

    The round's value uses that round's model and the defense's flags so far
    (before detection nobody is flagged: DR = FPR = 0). It measures, so it reads
    who is malicious (``loop.data.malicious``); the defense never does.
    """

    def __init__(self, trial: optuna.Trial, kind: str, benign_accuracy: float) -> None:
        self.trial, self.kind, self.benign_accuracy = trial, kind, benign_accuracy
        self.last_round = 0

    def on_round_end(self, loop: CollaborativeLoop, round_: int, metrics: dict[str, float]) -> None:
        if round_ <= self.last_round or metrics["accuracy"] is None:  # trained again after a recovery (Optuna
            return  # keeps a round's first value), or not evaluated (training.eval_every)
        self.last_round = round_
        self.trial.report(objective_value(self.kind, self.round_metrics(loop, metrics)), round_)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at round {round_}")

    def round_metrics(self, loop: CollaborativeLoop, metrics: dict[str, float]) -> dict[str, float]:
        dr, fpr = defense_detection_rates(type(loop.defense).flags, loop.defense.flagged, loop.excluded,
                                          loop.data.malicious, loop.participants or None)
        return {**metrics, "detection_rate": dr or 0.0, "false_positive_rate": fpr or 0.0,
                "accuracy_drop": accuracy_drop(self.benign_accuracy, metrics["accuracy"])}
