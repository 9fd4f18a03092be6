"""``auror run``: the arms of one experiment for each seed, in process, tracked in MLflow and
checkpointed after every round (:mod:`pipeline.experiment.resume`); the cells of a grid
(:mod:`pipeline.experiment.grid`) run here one at a time too."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import mlflow
import torch

from pipeline.core.device import describe_device, select_device
from pipeline.core.loop import Callback
from pipeline.core.metrics import accuracy_drop
from pipeline.experiment.arms import (DEFAULT_ARMS, METRICS, ArmResult, DataCache, arm_defense, arm_params,
                                      check_arms, make_attack, poison_users, run_arm)
from pipeline.experiment.config import Config
from pipeline.experiment.store import write_csv, write_report_file
from pipeline.experiment.plots import plot_rounds
from pipeline.experiment.resume import Invocation, RunInterrupted, arm_run
from pipeline.experiment.tracking import MlflowRoundLogger, ProgressLogger, run_name, setup_mlflow

log = logging.getLogger("auror")

ROUND_METRICS = ("accuracy", "attack_success_rate")


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
    seeds = list(seeds if seeds is not None else [cfg.seed])
    # device and data errors surface before any run exists; the data of a seed is built once, here
    log.info("device: %s", describe_device(select_device(cfg.training.device)))
    data = DataCache()
    for seed in seeds:
        seeded = dataclasses.replace(cfg, seed=seed)
        clean = [data.get(seeded, arm) for arm in arms][0]
        attack = make_attack(seeded)
        attack.setup(clean.train_x)
        poison_users(copy.copy(clean), attack)  # the attack's data side fails here, not after a run
    experiment_id = setup_mlflow(cfg) if track else None
    invocation = resume
    if track and invocation is None:
        invocation = Invocation.create(cfg, seeds, arms)
    if invocation is not None and invocation.cell is None:
        log.info("checkpoints in %s (if interrupted: auror run --resume %s)", invocation.folder, invocation.id)
    per_seed, rounds = [], []
    try:
        for seed in seeds:
            results = _run_seed(dataclasses.replace(cfg, seed=seed), experiment_id, arms, invocation, data)
            per_seed.append({arm: {m: r.metrics[m] for m in METRICS} for arm, r in results.items()})
            rounds += [{"seed": seed, "arm": arm, **h} for arm, r in results.items() for h in r.history]
    except KeyboardInterrupt as err:
        if invocation is None or isinstance(err, RunInterrupted):
            raise
        raise RunInterrupted(invocation.id) from None
    except Exception as err:  # a lost server, say: the CLI names the resume command
        if invocation is not None and invocation.cell is None:
            err.resume_id = invocation.id
        raise
    final = average(per_seed)
    reports = Path(cfg.tracking.reports_dir)
    write_report_file(reports / "latest.json", json.dumps(final, indent=2) + "\n")
    write_csv(rounds, reports / "rounds.csv")  # (DVC plots read it)
    return final


def average(per_seed: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """Mean of each arm's metrics over seeds (``None`` stays ``None``)."""
    return {
        arm: {m: None if per_seed[0][arm][m] is None else sum(r[arm][m] for r in per_seed) / len(per_seed)
              for m in METRICS}
        for arm in per_seed[0]
    }


def _run_seed(cfg: Config, experiment_id: str | None, arms: Sequence[str], invocation: Invocation | None,
              data: DataCache) -> dict[str, ArmResult]:
    reports = Path(cfg.tracking.reports_dir)
    results: dict[str, ArmResult] = {}
    for arm in arms:
        log.info("seed %d, arm %s", cfg.seed, arm)
        callbacks: list[Callback] = [ProgressLogger(arm)]
        if experiment_id is None:
            results[arm] = _finish(run_arm(cfg, arm, callbacks, data=data), results)
            continue
        done = invocation.finished(cfg.seed, arm) if invocation is not None else None
        if done is not None:  # a resumed invocation: this arm finished before the interruption
            log.info("  finished before the interruption: %s", done["metrics"])
            results[arm] = ArmResult(arm, done["metrics"], done["history"], done["detection"], module=None)
            continue
        checkpoint = invocation.checkpoint(cfg.seed, arm) if invocation is not None else None
        with arm_run(experiment_id, cfg, arm, invocation):
            mlflow.log_params(arm_params(cfg, arm))
            result = _finish(run_arm(cfg, arm, [*callbacks, MlflowRoundLogger()], checkpoint, data), results)
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


def _finish(result: ArmResult, done: dict[str, ArmResult]) -> ArmResult:
    """Add the accuracy drop against the benign arm (run first, same seed; ``None`` without it)."""
    benign = done.get("benign", result if result.arm == "benign" else None)
    result.metrics["accuracy_drop"] = accuracy_drop(None if benign is None else benign.metrics["accuracy"],
                                                    result.metrics["accuracy"])
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
