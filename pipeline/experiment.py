"""One experiment: the same seed and data split, three arms.

- ``benign``: nobody attacks, no defense (the reference model M_B);
- ``attack``: the malicious users poison their data, no defense (M_P);
- ``auror``: the same attack, AUROR on the server (M_A).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import torch

from datamodules.digits import DigitsDataModule
from datamodules.federated import FederatedDataModule
from datamodules.gtsrb import GTSRBDataModule
from datamodules.mnist import MNISTDataModule
from lightning_modules.cnn import CNNClassifier
from lightning_modules.mlp import MLPClassifier
from pipeline.auror import Auror
from pipeline.config import Config, ConfigError
from pipeline.defenses import AurorCallback
from pipeline.loop import Callback, CollaborativeLoop, UserBehaviour
from pipeline.metrics import detection_rates
from pipeline.plots import plot_rounds
from pipeline.tracking import MlflowRoundLogger, ProgressLogger, run_name, run_tags, setup_mlflow

log = logging.getLogger("auror")

ARMS = ("benign", "attack", "auror")
ROUND_METRICS = ("accuracy", "attack_success_rate")
METRICS = ("accuracy", "attack_success_rate", "accuracy_drop", "detection_rate", "false_positive_rate")

DATAMODULES: dict[str, Callable[..., FederatedDataModule]] = {
    "digits": lambda cfg, **kw: DigitsDataModule(test_fraction=cfg.data.test_fraction, **kw),
    "mnist": lambda cfg, **kw: MNISTDataModule(root=cfg.data.root, download=cfg.data.download, **kw),
    "gtsrb": lambda cfg, **kw: GTSRBDataModule(root=cfg.data.root, download=cfg.data.download, **kw),
}
MODELS: dict[str, Callable[[Config, FederatedDataModule], torch.nn.Module]] = {
    "digits": lambda cfg, data: MLPClassifier(data.num_features, data.num_classes, cfg.training.hidden_sizes,
                                              cfg.training.lr),
    "mnist": lambda cfg, data: MLPClassifier(data.num_features, data.num_classes, cfg.training.hidden_sizes,
                                             cfg.training.lr),
    "gtsrb": lambda cfg, data: CNNClassifier(num_classes=data.num_classes, lr=cfg.training.lr),
}


@dataclass
class ArmResult:
    arm: str
    metrics: dict[str, float | None]
    history: list[dict[str, float]]
    detection: dict
    module: torch.nn.Module


def build_datamodule(cfg: Config, poison: bool) -> FederatedDataModule:
    """Prepare (download when allowed) and set up the users' data.

    Raises ``DatasetMissingError`` when the data cannot be found, and
    :class:`ConfigError` when the partition leaves a user too few samples.
    """
    a, u = cfg.attack, cfg.users
    data = DATAMODULES[cfg.data.name](
        cfg, num_users=u.num_users, malicious_fraction=u.malicious_fraction, source_class=a.source_class,
        target_class=a.target_class, poisoned_fraction=a.poisoned_fraction, poison=poison, seed=cfg.seed,
        partition=u.partition, dirichlet_alpha=u.dirichlet_alpha, min_samples=u.min_samples,
    )
    data.prepare_data()
    try:
        data.setup()
    except ValueError as err:  # the partition's one-line reason
        raise ConfigError(f"users.partition: {err}") from None
    return data


def user_behaviour(cfg: Config, malicious: torch.Tensor, attacking: bool) -> UserBehaviour:
    """Honest users train ``training.local_epochs``; attacking users use the attack's knobs."""
    a, attackers = cfg.attack, malicious & attacking
    return UserBehaviour(
        epochs=[a.malicious_epochs if m else cfg.training.local_epochs for m in attackers.tolist()],
        lr_multipliers=torch.where(attackers, a.malicious_lr_multiplier, 1.0),
        update_scale=torch.where(attackers, a.boost, 1.0),
    )


def run_arm(cfg: Config, arm: str, callbacks: list[Callback] = ()) -> ArmResult:
    """Train one arm from scratch and evaluate it (no tracking)."""
    attacking = arm != "benign"
    data = build_datamodule(cfg, poison=attacking)
    torch.manual_seed(cfg.seed)  # the same initial global model in every arm
    module = MODELS[cfg.data.name](cfg, data)
    defense = None
    if arm == "auror":
        d = cfg.defense
        defense = AurorCallback(Auror(d.alpha, d.tau, d.alpha_mode), d.window_rounds, d.window_reduce)
    loop = CollaborativeLoop(
        module, data, user_behaviour(cfg, data.malicious, attacking), cfg.training.rounds,
        cfg.training.batch_size, cfg.seed, cfg.attack.source_class, cfg.attack.target_class, cfg.protocol,
        callbacks=[*callbacks, *([defense] if defense else [])],
    )
    metrics: dict[str, float | None] = dict(loop.run())
    malicious = data.malicious.nonzero().flatten().tolist()
    detection = {"defense": None, "malicious_users": malicious}
    metrics["detection_rate"] = metrics["false_positive_rate"] = None
    if defense is not None:
        flagged = torch.zeros_like(data.malicious)
        flagged[sorted(defense.flagged)] = True
        metrics["detection_rate"], metrics["false_positive_rate"] = detection_rates(flagged, data.malicious)
        detection = {"defense": "auror", "malicious_users": malicious, **defense.report}
    return ArmResult(arm, metrics, loop.history, detection, module)


def run_experiment(cfg: Config, seeds: list[int] | None = None, track: bool = True) -> dict[str, dict[str, float | None]]:
    """Run the three arms for each seed (default: ``cfg.seed``), log every arm
    of every seed as an MLflow run (when ``track``), and write the final
    metrics, averaged over the seeds, to ``<reports_dir>/latest.json`` as
    ``{arm: {metric: value}}``. Returns them."""
    for seed in seeds if seeds is not None else [cfg.seed]:  # data errors surface before any run exists
        build_datamodule(dataclasses.replace(cfg, seed=seed), poison=True)
    experiment_id = setup_mlflow(cfg) if track else None
    per_seed = []
    for seed in seeds if seeds is not None else [cfg.seed]:
        results = _run_seed(dataclasses.replace(cfg, seed=seed), experiment_id)
        per_seed.append({arm: {m: r.metrics[m] for m in METRICS} for arm, r in results.items()})
    final = average(per_seed)
    reports = Path(cfg.tracking.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "latest.json").write_text(json.dumps(final, indent=2) + "\n")
    return final


def average(per_seed: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """Mean of each arm's metrics over seeds (``None`` stays ``None``)."""
    return {
        arm: {m: None if per_seed[0][arm][m] is None else sum(r[arm][m] for r in per_seed) / len(per_seed)
              for m in METRICS}
        for arm in per_seed[0]
    }


def _run_seed(cfg: Config, experiment_id: str | None) -> dict[str, ArmResult]:
    reports = Path(cfg.tracking.reports_dir)
    results: dict[str, ArmResult] = {}
    for arm in ARMS:
        log.info("seed %d, arm %s", cfg.seed, arm)
        callbacks: list[Callback] = [ProgressLogger(arm)]
        if experiment_id is None:
            results[arm] = _finish(run_arm(cfg, arm, callbacks), results)
            continue
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name(cfg, arm), tags=run_tags(cfg, arm)):
            mlflow.log_params(cfg.flat())
            result = _finish(run_arm(cfg, arm, [*callbacks, MlflowRoundLogger()]), results)
            # accuracy and attack success are already logged per round; the last round is the final model
            mlflow.log_metrics({k: v for k, v in result.metrics.items() if v is not None and k not in ROUND_METRICS})
            mlflow.log_dict(result.detection, "detection.json")
            mlflow.log_dict(cfg.to_dict(), "config.json")
            mlflow.log_artifact(str(plot_rounds(
                {arm: result.history}, reports / "plots" / f"{arm}.png", title=run_name(cfg, arm),
                detection_rounds={arm: result.detection.get("detection_round")})))
        results[arm] = result
    plot_rounds({a: r.history for a, r in results.items()}, reports / "latest.png",
                title=f"{cfg.data.name}, {cfg.users.malicious_fraction:.0%} malicious users, seed {cfg.seed}",
                detection_rounds={a: r.detection.get("detection_round") for a, r in results.items()})
    return results


def _finish(result: ArmResult, done: dict[str, ArmResult]) -> ArmResult:
    """Add the accuracy drop against the benign arm (run first, same seed)."""
    benign = done.get("benign", result)
    result.metrics["accuracy_drop"] = benign.metrics["accuracy"] - result.metrics["accuracy"]
    return result
