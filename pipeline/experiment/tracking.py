"""MLflow tracking: one run per arm, per-round metrics with ``step=round``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow

from pipeline.experiment.arms import make_attack
from pipeline.experiment.config import Config
from pipeline.experiment.grid import code_version
from pipeline.experiment.storage import store_lock
from pipeline.core.device import describe_device, select_device
from pipeline.core.loop import Callback, CollaborativeLoop

log = logging.getLogger("auror")


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute: MLflow caches a store per
    URI string, so in one process a relative one would stay bound to the first cwd."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def setup_mlflow(cfg: Config) -> str:
    """Point MLflow at the configured store; create the experiment when missing. Returns its id.

    With a local store the experiment's artifacts go under ``tracking.artifact_dir``; with a
    tracking server (``http://``) they go where the server puts them (its
    ``--artifacts-destination``), so every worker's artifacts are in one place."""
    uri = cfg.tracking.tracking_uri
    mlflow.set_tracking_uri(absolute_uri(uri))
    with store_lock(uri):
        return _experiment_id(cfg, uri)


def _experiment_id(cfg: Config, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    served = uri.startswith(("http://", "https://"))
    location = None if served else Path(cfg.tracking.artifact_dir).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # another worker created it a moment ago
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


def run_tags(cfg: Config, arm: str) -> dict[str, str]:
    """Tags that let ``mlflow ui`` filter and compare arms."""
    return {
        "arm": arm,
        "dataset": cfg.data.name,
        "attack": cfg.attack.name,
        # what attack_success_rate measures: source_to_target, backdoor, or accuracy_drop (untargeted: SR empty)
        "attack.success_metric": make_attack(cfg).success_metric,
        "malicious_fraction": str(cfg.users.malicious_fraction),
        "defense": "none" if arm in ("benign", "attack") else arm,
        "seed": str(cfg.seed),
        "git_commit": code_version() or "unknown",
        "device": describe_device(select_device(cfg.training.device)),  # CNN metrics depend on it (README)
    }


def run_name(cfg: Config, arm: str) -> str:
    """``<dataset>-<arm>-f<fraction>-seed<seed>``, the attack's name after the dataset unless label_flip."""
    attack = "" if cfg.attack.name == "label_flip" else f"-{cfg.attack.name}"
    return f"{cfg.data.name}{attack}-{arm}-f{cfg.users.malicious_fraction:g}-seed{cfg.seed}"


class MlflowRoundLogger(Callback):
    """Logs every round's metrics to the active MLflow run."""

    def on_round_end(self, loop: CollaborativeLoop, round_: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=round_)  # untargeted: no SR


class ProgressLogger(Callback):
    """One line every ``every`` rounds, at the last one, and whenever ``quiet_s`` seconds
    passed without one (slow rounds, e.g. the GTSRB CNN on a CPU, still show progress)."""

    def __init__(self, arm: str, every: int = 10, quiet_s: float = 15.0) -> None:
        self.arm, self.every, self.quiet_s = arm, every, quiet_s
        self.started = self.last = time.monotonic()

    def on_run_start(self, loop: CollaborativeLoop) -> None:
        self.started = self.last = time.monotonic()

    def on_round_end(self, loop: CollaborativeLoop, round_: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if round_ % self.every == 0 or round_ == loop.rounds or now - self.last >= self.quiet_s:
            self.last = now
            success = metrics["attack_success_rate"]
            log.info("  [%s] round %d/%d  accuracy %.3f  attack success %s  (%.0f s)", self.arm, round_,
                     loop.rounds, metrics["accuracy"], "-" if success is None else f"{success:.3f}", now - self.started)
