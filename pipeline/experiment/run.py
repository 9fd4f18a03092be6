"""One experiment: the same seed and data split, several arms.

- ``benign``: nobody attacks, no defense (the reference model M_B);
- ``attack``: the malicious users run the attack ``attack.name``, no defense (M_P);
- one arm per registered defense (``auror``, ``krum``, ...): the same attack,
  that defense on the server (for AUROR, the paper's M_A).

Every arm measures the attack's own success metric (the benign arm too: its
baseline).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlflow
import torch

from datamodules.digits import DigitsDataModule
from datamodules.federated import FederatedDataModule
from datamodules.gtsrb import GTSRBDataModule
from datamodules.mnist import MNISTDataModule
from lightning_modules.cnn import CNNClassifier
from lightning_modules.mlp import MLPClassifier
from pipeline.core.checkpoint import Checkpoint
from pipeline.core.device import describe_device, select_device
from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.attacks.base import Attack, UserData
from pipeline.core.loop import Callback, CollaborativeLoop, UserBehaviour
from pipeline.core.metrics import defense_detection_rates
from pipeline.defenses import REGISTRY
from pipeline.experiment.config import Config, ConfigError
from pipeline.experiment.plots import plot_rounds
from pipeline.experiment.resume import Invocation, RunInterrupted, arm_run
from pipeline.experiment.tracking import MlflowRoundLogger, ProgressLogger, run_name, setup_mlflow

log = logging.getLogger("auror")

# benign and attack run without defense; every other arm is the attack against the defense of that name
ARMS = ("benign", "attack", *(name for name in REGISTRY if name != "none"))
DEFAULT_ARMS = ("benign", "attack", "auror")
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
    example: torch.Tensor | None = None  # one test input: logging the model traces it


def arm_defense(arm: str) -> str:
    """The registered defense an arm runs: ``none`` for the benign and attack arms."""
    return "none" if arm in ("benign", "attack") else arm


def check_arms(cfg: Config, arms: Sequence[str]) -> list[str]:
    """The arms in run order (benign first: the others' accuracy drop needs it); raises
    :class:`ConfigError` for an unknown arm or a defense the config cannot run (its ``check_config``)."""
    for arm in arms:
        if arm not in ARMS:
            raise ConfigError(f"--arms: must be benign, attack or a registered defense ({', '.join(ARMS[2:])}), "
                              f"got {arm!r}")
        name = arm_defense(arm)
        REGISTRY[name].check_config(getattr(cfg.defense, name), cfg, f"defense.{name}")
    return [a for a in ARMS if a in arms]


def make_attack(cfg: Config) -> Attack:
    """The configured attack (``attack.name``) with its own section."""
    return ATTACKS[cfg.attack.name](getattr(cfg.attack, cfg.attack.name), cfg.attack)


def build_datamodule(cfg: Config, poison: bool, root_size: int = 0) -> FederatedDataModule:
    """Prepare (download when allowed) and set up the users' data; when ``poison``, the
    malicious users' data as the configured attack leaves it (:func:`poison_users`).

    ``root_size`` samples are held out as the server's root set (FLTrust).
    Raises ``DatasetMissingError`` when the data cannot be found, and
    :class:`ConfigError` when the partition leaves a user too few samples.
    """
    u = cfg.users
    data = DATAMODULES[cfg.data.name](
        cfg, num_users=u.num_users, malicious_fraction=u.malicious_fraction, seed=cfg.seed,
        partition=u.partition, dirichlet_alpha=u.dirichlet_alpha, min_samples=u.min_samples, root_size=root_size,
    )
    data.prepare_data()
    try:
        data.setup()
    except ValueError as err:  # the partition's one-line reason
        raise ConfigError(f"users.partition: {err}") from None
    fewest = min(len(i) for i in data.user_indices)
    if fewest < u.min_samples:  # the Dirichlet partition checks it itself
        raise ConfigError(f"users.num_users: {u.num_users} users leave one with {fewest} training samples, fewer "
                          f"than users.min_samples={u.min_samples}")
    if poison:
        attack = make_attack(cfg)
        attack.setup(data.train_x)
        poison_users(data, attack)
    return data


def poison_users(data: FederatedDataModule, attack: Attack) -> None:
    """The attack's data side: the malicious users' data replaced by what they train on."""
    poisoned = attack.poison_data(UserData(data.train_x, data.train_y, data.user_indices, data.malicious),
                                  data.poison_rng())
    data.train_x, data.train_y, data.poisoned = poisoned.x, poisoned.y, poisoned.poisoned


def prepare_dataset(cfg: Config) -> Path:
    """Download (when allowed) and decode the dataset; write its sizes to
    ``<reports_dir>/data.json`` (what DVC's prepare stage outputs: the data
    itself lives outside the repository, under data.root or AUROR_DATA_DIR)."""
    data = build_datamodule(cfg, poison=False)
    info = {"dataset": cfg.data.name, "train_samples": len(data.train_y), "test_samples": len(data.test_y),
            "classes": data.num_classes, "input_shape": list(data.test_x.shape[1:])}
    path = Path(cfg.tracking.reports_dir) / "data.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info) + "\n")
    return path


def user_behaviour(cfg: Config, malicious: torch.Tensor, attacking: bool) -> UserBehaviour:
    """Honest users train ``training.local_epochs``; attacking users use the shared attack knobs
    their attack reads (``malicious_epochs``, ``malicious_lr_multiplier``, ``boost``), and
    the attack's anomaly weight ``w`` (``model_replacement``) as ``(1 - w)`` on their loss plus the pull ``2 w``."""
    a, attackers = cfg.attack, malicious & attacking
    attack = make_attack(cfg)
    trains = attackers & attack.trains_maliciously
    anomaly = attack.anomaly_weight()
    return UserBehaviour(
        epochs=[a.malicious_epochs if m else cfg.training.local_epochs for m in trains.tolist()],
        lr_multipliers=torch.where(trains, a.malicious_lr_multiplier * (1 - anomaly), 1.0),
        update_scale=torch.where(attackers & attack.boosted, a.boost, 1.0),
        attackers=attackers,
        pull=torch.where(attackers, 2 * anomaly, 0.0) if anomaly > 0 else None,
    )


def run_arm(cfg: Config, arm: str, callbacks: list[Callback] = (), checkpoint: Checkpoint | None = None) -> ArmResult:
    """Train one arm from scratch (or from ``checkpoint`` when it exists; saved
    after every round) on ``training.device`` and evaluate it (no tracking).
    The returned module is on the CPU."""
    name = arm_defense(arm)
    defense, params = REGISTRY[name], getattr(cfg.defense, name)
    attack = make_attack(cfg)
    data = build_datamodule(cfg, poison=False, root_size=params.root_size if defense.needs_root_data else 0)
    attack.setup(data.train_x)
    if arm != "benign":
        poison_users(data, attack)
    torch.manual_seed(cfg.seed)  # the same initial global model in every arm, on every device
    module = MODELS[cfg.data.name](cfg, data)
    loop = CollaborativeLoop(
        module, data, user_behaviour(cfg, data.malicious, arm != "benign"), cfg.training.rounds,
        cfg.training.batch_size, cfg.seed, attack, cfg.protocol,
        callbacks=list(callbacks), faults=cfg.faults, checkpoint=checkpoint,
        device=select_device(cfg.training.device), make_defense=lambda server: defense(params, server),
        root_epochs=cfg.training.local_epochs,
    )
    metrics: dict[str, float | None] = dict(loop.run())
    module.cpu()  # logged and exported with a CPU example input
    metrics["detection_rate"], metrics["false_positive_rate"] = defense_detection_rates(
        defense.flags, loop.defense.flagged, loop.excluded, data.malicious)
    detection = {"defense": name, "flags": defense.flags, "malicious_users": data.malicious.nonzero().flatten().tolist(),
                 **loop.defense.report()}
    if defense.flags == "round":
        detection["excluded_per_round"] = loop.excluded
    return ArmResult(arm, metrics, loop.history, detection, module, data.test_x[:1])


def run_experiment(cfg: Config, seeds: list[int] | None = None, track: bool = True,
                   arms: Sequence[str] = DEFAULT_ARMS,
                   resume: Invocation | None = None) -> dict[str, dict[str, float | None]]:
    """Run the ``arms`` (default: benign, attack, auror) for each seed (default: ``cfg.seed``),
    log every arm of every seed as an MLflow run (when ``track``), and write the
    final metrics, averaged over the seeds, to ``<reports_dir>/latest.json`` as
    ``{arm: {metric: value}}`` and the per-round metrics to ``<reports_dir>/rounds.csv``.
    Returns the final metrics. Without the benign arm, ``accuracy_drop`` is ``None``.

    When ``track``, every round is checkpointed (:mod:`pipeline.experiment.resume`); ``resume``
    continues such an invocation (pass its ``cfg``, ``seeds`` and ``arms``). Ctrl-C
    raises :class:`~pipeline.experiment.resume.RunInterrupted`, which names it."""
    arms = check_arms(cfg, arms)
    # device and data errors surface before any run exists
    log.info("device: %s", describe_device(select_device(cfg.training.device)))
    for seed in seeds if seeds is not None else [cfg.seed]:
        build_datamodule(dataclasses.replace(cfg, seed=seed), poison=True)
    experiment_id = setup_mlflow(cfg) if track else None
    invocation = resume
    if track and invocation is None:
        invocation = Invocation.create(cfg, list(seeds if seeds is not None else [cfg.seed]), arms)
    if invocation is not None:
        log.info("checkpoints in %s (if interrupted: auror run --resume %s)", invocation.folder, invocation.id)
    per_seed, rounds = [], []
    try:
        for seed in seeds if seeds is not None else [cfg.seed]:
            results = _run_seed(dataclasses.replace(cfg, seed=seed), experiment_id, arms, invocation)
            per_seed.append({arm: {m: r.metrics[m] for m in METRICS} for arm, r in results.items()})
            rounds += [{"seed": seed, "arm": arm, **h} for arm, r in results.items() for h in r.history]
    except KeyboardInterrupt as err:
        if invocation is None or isinstance(err, RunInterrupted):
            raise
        raise RunInterrupted(invocation.id) from None
    final = average(per_seed)
    reports = Path(cfg.tracking.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "latest.json").write_text(json.dumps(final, indent=2) + "\n")
    write_csv(rounds, reports / "rounds.csv")
    return final


def write_csv(rows: list[dict], path: Path) -> Path:
    """Rows with the same keys as a CSV file with a header (DVC plots read it)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def average(per_seed: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """Mean of each arm's metrics over seeds (``None`` stays ``None``)."""
    return {
        arm: {m: None if per_seed[0][arm][m] is None else sum(r[arm][m] for r in per_seed) / len(per_seed)
              for m in METRICS}
        for arm in per_seed[0]
    }


def _run_seed(cfg: Config, experiment_id: str | None, arms: Sequence[str] = DEFAULT_ARMS,
              invocation: Invocation | None = None) -> dict[str, ArmResult]:
    reports = Path(cfg.tracking.reports_dir)
    results: dict[str, ArmResult] = {}
    for arm in arms:
        log.info("seed %d, arm %s", cfg.seed, arm)
        callbacks: list[Callback] = [ProgressLogger(arm)]
        if experiment_id is None:
            results[arm] = _finish(run_arm(cfg, arm, callbacks), results)
            continue
        done = invocation.finished(cfg.seed, arm) if invocation is not None else None
        if done is not None:  # a resumed invocation: this arm finished before the interruption
            log.info("  finished before the interruption: %s", done["metrics"])
            results[arm] = ArmResult(arm, done["metrics"], done["history"], done["detection"], module=None)
            continue
        checkpoint = invocation.checkpoint(cfg.seed, arm) if invocation is not None else None
        with arm_run(experiment_id, cfg, arm, invocation):
            mlflow.log_params(arm_params(cfg, arm))
            result = _finish(run_arm(cfg, arm, [*callbacks, MlflowRoundLogger()], checkpoint), results)
            # accuracy and attack success are already logged per round; the last round is the final model
            mlflow.log_metrics({k: v for k, v in result.metrics.items() if v is not None and k not in ROUND_METRICS})
            mlflow.log_dict(result.detection, "detection.json")
            mlflow.log_dict(cfg.to_dict(), "config.json")
            mlflow.log_artifact(str(plot_rounds(
                {arm: result.history}, reports / "plots" / f"{arm}.png", title=run_name(cfg, arm),
                detection_rounds={arm: result.detection.get("detection_round")})))
            if arm_defense(arm) != "none":
                log_model(result)
        if invocation is not None:
            invocation.finish_arm(cfg.seed, arm, result.metrics, result.history, result.detection)
        results[arm] = result
    plot_rounds({a: r.history for a, r in results.items()}, reports / "latest.png",
                title=f"{cfg.data.name}, {cfg.users.malicious_fraction:.0%} malicious users, seed {cfg.seed}",
                detection_rounds={a: r.detection.get("detection_round") for a, r in results.items()})
    return results


def arm_params(cfg: Config, arm: str) -> dict:
    """The config as MLflow params, with only this arm's defense section and the configured attack's
    section (the others do not apply)."""
    own = (f"defense.{arm_defense(arm)}.", f"attack.{cfg.attack.name}.")
    others = tuple(f"attack.{name}." for name in ATTACKS)
    return {k: v for k, v in cfg.flat().items() if not k.startswith(("defense.", *others)) or k.startswith(own)}


def _finish(result: ArmResult, done: dict[str, ArmResult]) -> ArmResult:
    """Add the accuracy drop against the benign arm (run first, same seed; ``None`` without it)."""
    benign = done.get("benign", result if result.arm == "benign" else None)
    result.metrics["accuracy_drop"] = None if benign is None else benign.metrics["accuracy"] - result.metrics["accuracy"]
    return result


def log_model(result: ArmResult) -> None:
    """Log the final global model to the active MLflow run as an MLflow model.

    ``pt2`` (torch.export, MLflow 3's default) is the format that does not run
    pickled code on load; it traces the model on one test input. Pinning the
    requirements skips MLflow's slow requirement inference.
    """
    import mlflow.pytorch  # slow import, only where a model is logged

    # torch.export's notes on a CPU model traced with one example are noise to the user
    export_log = logging.getLogger("torch._export.non_strict_utils")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No complete tensor found")
            mlflow.pytorch.log_model(result.module.eval(), name="model", input_example=result.example.numpy(),
                                     serialization_format="pt2",
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    finally:
        export_log.setLevel(level)
