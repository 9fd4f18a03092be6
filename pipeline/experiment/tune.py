"""Optuna studies over the experiment: tune a defense against an attack, or an attack against a defense.

Two kinds of study, both maximised, every trial one run of the defense's arm
(``--defense``, default ``auror``; any registered defense):

- ``defense``: searches the defense's own parameters (its ``search_space``;
  AUROR's: ``alpha_mode`` (absolute | quantile, each with its own ``alpha``
  range), ``alpha``, ``tau`` and ``window_rounds``) against the configured
  attack. The objective is the scalarisation

      DR - FPR - SR - max(AD, 0)

  of the arm's detection rate, false-positive rate, attack success rate
  and accuracy drop against the benign arm (run once per study, its accuracy
  cached in the study). 1 is the ideal (every attacker flagged, no honest
  user, no attack success, no accuracy lost); SR cannot fall below the
  benign model's own confusion of source as target. A robust aggregator that
  flags nobody counts DR = FPR = 0.
- ``attack``: searches the configured attack's knobs (``attack.name``; its
  ``search_ranges``: for ``label_flip`` ``attack.poisoned_fraction``,
  ``attack.boost``, ``attack.malicious_epochs``, ``attack.malicious_lr_multiplier``)
  and the number of malicious users (at most ``max_malicious_fraction`` of
  them) against the chosen defense; the objective is the defense arm's SR
  (the accuracy drop for an untargeted attack).

The first trial of a new study is the configured setting itself (a baseline): it searches no
parameter and runs the config as given (``attack.alie.z: 0`` is z_max, not the range's low end);
the trials CSV marks it ``configured``. A trial whose choices give the config of a complete trial (a
choice without knobs proposed again) takes that trial's value and metrics without
running (a run is a function of its config and seed), the CSV says whose, and it does not count in
``n_trials``: a study asks until ``n_trials`` settings were tried, or 3 x ``n_trials`` trials in all.
Every round reports its value (the same formula on that round's model and
flags) to a median pruner, which stops a trial worse than the median of
earlier trials at the same round, once detection can have happened.

Storage and resuming: studies live in an RDB storage (default
``sqlite:///mlruns/optuna.db``; a PostgreSQL URL lets several machines run
trials of one study). ``n_trials`` is the study's total budget of finished
(complete or pruned) trials: running the same command again continues the
study and runs only the missing trials; a finished study runs none. A study
refuses to continue under a different config (other than ``tracking``).
Ctrl-C marks the running trial FAIL and its MLflow run KILLED; a trial whose
process died (SIGKILL, power loss) is marked FAIL once its heartbeat is
older than ``GRACE_PERIOD_S`` seconds, by the next ``auror tune`` on
that study.

MLflow: one parent run per study (reopened on resume) with one nested run
per trial (params, per-round metrics, final metrics, objective); the parent
gets the optimisation history and parameter importances as PNGs. The best
trial's full config is written as a params file that ``auror run --params``
accepts.

The study's pieces: :mod:`pipeline.experiment.objectives` (what is optimised),
:mod:`pipeline.experiment.studies` (storage and lifecycle), :mod:`pipeline.experiment.trials` (what a
study leaves); this module runs one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.device import select_device
from pipeline.core.metrics import accuracy_drop
from pipeline.defenses.compose import defense_class
from pipeline.experiment.arms import DataCache, arm_params, check_defenses, run_arm
from pipeline.experiment.config import Config, ConfigError, check_name, with_overrides
from pipeline.experiment.grid import Cell, cell_key
from pipeline.experiment.storage import STUDY_STORAGE
from pipeline.experiment.store import ResultsStore
from pipeline.lazy import OnFirstUse

if TYPE_CHECKING:
    from pipeline.core.loop import Callback

# Optuna, MLflow and the study's modules load when a study runs: a refused study needs none of them
mlflow, optuna = OnFirstUse("mlflow"), OnFirstUse("optuna")
objectives, studies, tracking, trials = (OnFirstUse(f"pipeline.experiment.{name}")
                                         for name in ("objectives", "studies", "tracking", "trials"))

log = logging.getLogger("auror")

KINDS = ("defense", "attack")


@dataclass
class StudySpec:
    """What ``auror tune`` was asked for: the base config, parsed and validated once, and the study's options."""

    cfg: Config
    kind: str = "defense"
    defense: str = "auror"  # the defense tuned (kind defense) or attacked (kind attack)
    n_trials: int = 20
    storage: str | None = None  # None: STUDY_STORAGE
    study_name: str | None = None
    max_malicious_fraction: float | None = None
    fixed_attackers: bool = False  # kind attack: search the attack's knobs only, with the configured attackers
    benign_store: Path | None = None  # a results store the benign arm is read from and recorded in, by its key
    extra_callbacks: list[Callback] = field(default_factory=list)  # added to every trial's loop (tests)


@dataclass
class StudyResult:
    study: optuna.Study
    best_params_path: Path | None
    parent_run_id: str
    storage: str


def validate_spec(spec: StudySpec, cfg: Config) -> tuple[str, float]:
    """Check the CLI values; return the study name and the malicious-user budget."""
    if spec.kind not in KINDS:
        raise ConfigError(f"--kind: must be one of {', '.join(KINDS)}, got {spec.kind!r}")
    if spec.n_trials < 1:
        raise ConfigError(f"--n-trials: must be >= 1, got {spec.n_trials}")
    check_defenses("--defense", cfg, [spec.defense])
    if spec.kind == "defense" and not defense_class(spec.defense).search_ranges:
        raise ConfigError(f"--defense: {spec.defense} has no parameters to search (tune --kind attack against it)")
    # AUROR's studies of label flipping keep their historical names (defense-digits); the others carry
    # the defense's name, and an attack study the attack's
    attack = [cfg.attack.name] if spec.kind == "attack" and cfg.attack.name != "label_flip" else []
    defense = [spec.defense.replace("+", ".")] if spec.defense != "auror" else []  # (nnm+median: nnm.median)
    name = spec.study_name or "-".join([spec.kind, *attack, *defense, cfg.data.name])
    check_name("--study-name", name)
    budget = cfg.users.malicious_fraction if spec.max_malicious_fraction is None else spec.max_malicious_fraction
    if not 0 < budget < 0.5:
        raise ConfigError(f"--max-malicious-fraction: must be in (0, 0.5), got {budget!r}")
    if spec.kind == "defense" and round(cfg.users.malicious_fraction * cfg.users.num_users) == 0:
        raise ConfigError(f"users.malicious_fraction: a defense study needs malicious users, got "
                          f"{cfg.users.malicious_fraction!r} of {cfg.users.num_users} users")
    if spec.kind == "attack" and objectives.max_malicious_users(cfg, budget) < 1:
        raise ConfigError(f"--max-malicious-fraction: {budget!r} of {cfg.users.num_users} users is less than one user")
    select_device(cfg.training.device)  # a missing GPU is refused before the study starts
    return name, budget


def study_setting(spec: StudySpec, budget: float) -> dict:
    """What the spec's study must have been made with to be continued or read."""
    setting = studies.study_setting(spec.kind, spec.defense, spec.cfg, budget)
    if spec.fixed_attackers:  # (a key only then: the studies made before it are still found)
        setting["fixed_attackers"] = True
    return setting


def load_study(spec: StudySpec, storage: optuna.storages.RDBStorage, elsewhere: str = "pick a new --study-name"
               ) -> optuna.Study | None:
    """The spec's study as ``storage`` (opened once by the caller) holds it, running nothing; None when it
    was never made. One of another setting is refused, saying how to go ``elsewhere``."""
    name, budget = validate_spec(spec, spec.cfg)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    studies.check_setting(study, name, study_setting(spec, budget), elsewhere)
    return study


@contextlib.contextmanager
def child_run(experiment_id: str, run_name: str, tags: dict[str, str]):
    """A nested MLflow run: FINISHED when complete or pruned, KILLED on Ctrl-C, FAILED on an error."""
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags, nested=True)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except optuna.TrialPruned:
        status = "FINISHED"
        mlflow.set_tag("optuna_state", "PRUNED")
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        mlflow.set_tag("optuna_state", "FAIL")
        raise
    finally:
        mlflow.end_run(status)


def start_parent_run(study: optuna.Study, experiment_id: str, name: str, spec: StudySpec, cfg: Config) -> str:
    """The study's parent run: the one of an earlier run of the study when it still exists."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            return mlflow.start_run(run_id=run_id).info.run_id
        except mlflow.exceptions.MlflowException:
            log.info("parent run %s of study %s not in this MLflow store: starting a new one", run_id, name)
    tags = {"optuna_study": name, "kind": f"tune-{spec.kind}", "dataset": cfg.data.name, "defense": spec.defense,
            "git_commit": tracking.run_tags(cfg, spec.defense)["git_commit"]}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"tune-{name}", tags=tags)
    # workers that start a new study together each made one: all keep the earliest, the others go
    first = earliest_parent_run(experiment_id, name)
    if first != run.info.run_id:
        mlflow.end_run("FINISHED")
        mlflow.delete_run(run.info.run_id)
        return mlflow.start_run(run_id=first).info.run_id
    mlflow.log_params({f"base.{k}": v for k, v in arm_params(cfg, spec.defense).items() if not k.startswith("tracking.")})
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def earliest_parent_run(experiment_id: str, name: str) -> str:
    runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string=f"tags.optuna_study = '{name}'",
                              output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return min(parents, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def benign_accuracy(study: optuna.Study, cfg: Config, data: DataCache, store: Path | None = None) -> float:
    """The benign arm's accuracy for the study's config: run once, then read from the study; with a results
    ``store``, read from it by the benign cell's key when another study recorded it (``auror worst-case``: the
    studies of one config share their benign arm), else recorded there."""
    if "benign_accuracy" not in study.user_attrs:
        cell = Cell("benign", "benign", cfg.seed, cell_key(cfg, "benign"), cfg)
        recorded = ResultsStore(store) if store is not None else None
        found = recorded.results("benign", [cell]) if recorded is not None else {}
        if cell.key in found:
            metrics = found[cell.key]
            log.info("benign arm: recorded in %s", store)
        else:
            log.info("benign arm (once per study, for the accuracy drop)")
            metrics = run_arm(cfg, "benign", [tracking.ProgressLogger("benign")], data=data).metrics
            if recorded is not None:
                recorded.record("benign", [cell], {cell.key: metrics})
        study.set_user_attr("benign_accuracy", metrics["accuracy"])
    return study.user_attrs["benign_accuracy"]


def same_config_trial(study: optuna.Study, spec: StudySpec, key: str) -> optuna.trial.FrozenTrial | None:
    """A complete trial of ``study`` that ran the config whose cell key is ``key`` (None if none did)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t for t in done if "metrics" in t.user_attrs and
                 cell_key(with_overrides(spec.cfg, t.user_attrs["overrides"]), spec.defense) == key), None)


def make_objective(spec: StudySpec, name: str, budget: float, benign: float, experiment_id: str,
                   started: list[int], data: DataCache):
    def objective(trial: optuna.Trial) -> float:
        started.append(trial.number)
        if studies.claimed_before(trial.study, trial.number) >= spec.n_trials:
            trial.set_user_attr("surplus", True)
            raise studies.SurplusTrial(f"trial {trial.number}: the study's {spec.n_trials} trials are taken by other workers")
        if trial.user_attrs.get("baseline") and studies.earlier_baseline(trial.study, trial.number):
            trial.set_user_attr("surplus", True)  # workers that opened the new study at once each queued trial 0
            raise studies.SurplusTrial(f"trial {trial.number}: another worker queued the configured setting first")
        # the first trial is the configured setting: it searches nothing
        overrides = [] if trial.user_attrs.get("baseline") else objectives.suggest(
            spec.kind, spec.defense, trial, spec.cfg, None if spec.fixed_attackers else budget)
        trial.set_user_attr("overrides", overrides)
        cfg = with_overrides(spec.cfg, overrides)
        same = same_config_trial(trial.study, spec, cell_key(cfg, spec.defense))
        if same is not None:  # a run is a function of its config and seed (a choice that changes nothing, say)
            log.info("trial %d: the config of trial %d; its value, not run again", trial.number, same.number)
            trial.set_user_attr("metrics", same.user_attrs["metrics"])
            trial.set_user_attr("same_as", same.number)
            return same.value
        tags = {**tracking.run_tags(cfg, spec.defense), "optuna_study": name, "optuna_trial": str(trial.number),
                "kind": f"tune-{spec.kind}"}
        with child_run(experiment_id, f"{name}-trial{trial.number}", tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(arm_params(cfg, spec.defense))
            callbacks = [tracking.ProgressLogger(f"trial {trial.number}"), tracking.MlflowRoundLogger(),
                         objectives.TrialReporter(trial, spec.kind, benign), *spec.extra_callbacks]
            metrics = dict(run_arm(cfg, spec.defense, callbacks, data=data).metrics)
            metrics["accuracy_drop"] = accuracy_drop(benign, metrics["accuracy"])
            value = objectives.objective_value(spec.kind, metrics)
            trial.set_user_attr("metrics", metrics)
            mlflow.log_metrics({"objective": value, **{k: v for k, v in metrics.items()
                                                       if v is not None and k not in ("accuracy", "attack_success_rate")}})
            mlflow.set_tag("optuna_state", "COMPLETE")
        return value

    return objective


def run_study(spec: StudySpec) -> StudyResult:
    """Create or continue the study, run the missing trials, write the best-params file.

    Raises ``KeyboardInterrupt`` after Ctrl-C, with the running trial marked
    FAIL and the MLflow parent run KILLED.
    """
    base = spec.cfg
    name, budget = validate_spec(spec, base)
    if base.tracking.tracking_uri.startswith(("http://", "https://")):  # before the study is opened or made
        tracking.check_tracking_server(base.tracking.tracking_uri, base.tracking.experiment)
    data = DataCache()  # trials that vary only the attack's or the defense's knobs share the seed's data
    data.get(base, "benign")  # a missing dataset or a bad partition, refused before the study is opened
    storage = studies.open_storage(spec.storage or STUDY_STORAGE)
    study = studies.open_study(storage, name, study_setting(spec, budget), base.seed)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3,
                                               n_warmup_steps=objectives.warmup_rounds(spec.kind, spec.defense, base))
    experiment_id = tracking.setup_mlflow(base)
    studies.fail_stale_trials(study)
    if not study.trials:
        study.enqueue_trial({}, user_attrs={"baseline": True})
    parent_id = start_parent_run(study, experiment_id, name, spec, base)
    started: list[int] = []
    try:
        mlflow.set_tag("n_trials", str(spec.n_trials))
        benign = benign_accuracy(study, base, data, spec.benign_store)
        mlflow.log_metric("benign_accuracy", benign)
        finished = studies.count_finished(study)
        remaining = max(spec.n_trials - finished, 0)
        log.info("study %s: %d finished trials of %d, running %d more", name, finished, spec.n_trials, remaining)
        if remaining > 0:
            studies.run_trials(study, make_objective(spec, name, budget, benign, experiment_id, started, data), spec.n_trials)
        trials.log_study_plots(study)
        path = trials.write_best_params(study, base, spec.kind, name)
        mlflow.log_artifact(str(trials.write_trials(study, name, base.tracking.reports_dir)))
        if path is not None:
            mlflow.log_metric("best_value", study.best_value)
            mlflow.set_tag("best_trial", str(study.best_trial.number))
            mlflow.log_artifact(str(path))
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            studies.fail_running(study, started)
        mlflow.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")
    return StudyResult(study, path, parent_id, spec.storage or STUDY_STORAGE)
