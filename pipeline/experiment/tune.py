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

The first trial of a new study is the configured setting itself (a baseline).
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
older than :data:`GRACE_PERIOD_S` seconds, by the next ``auror tune`` on
that study.

MLflow: one parent run per study (reopened on resume) with one nested run
per trial (params, per-round metrics, final metrics, objective); the parent
gets the optimisation history and parameter importances as PNGs. The best
trial's full config is written as a params file that ``auror run --params``
accepts.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from pipeline.attacks import REGISTRY as ATTACKS  # noqa: E402
from pipeline.core.device import select_device  # noqa: E402
from pipeline.core.loop import Callback, CollaborativeLoop  # noqa: E402
from pipeline.core.metrics import defense_detection_rates  # noqa: E402
from pipeline.defenses import REGISTRY  # noqa: E402
from pipeline.experiment.config import Config, ConfigError, load_config  # noqa: E402
from pipeline.experiment.run import arm_params, check_arms, run_arm  # noqa: E402
from pipeline.experiment.storage import database_url, store_lock  # noqa: E402
from pipeline.experiment.tracking import MlflowRoundLogger, ProgressLogger, run_tags, setup_mlflow  # noqa: E402

log = logging.getLogger("auror")

KINDS = ("defense", "attack")
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
HEARTBEAT_S = 10  # a running trial writes a heartbeat this often ...
GRACE_PERIOD_S = 30  # ... and is presumed dead (FAIL) when the last one is older than this
MAX_RETRIES = 3  # a trial whose worker died runs again at most this often
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards n_trials
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # it names the best-params file



def _no_traceback_for_ctrl_c(record: logging.LogRecord) -> bool:
    """Optuna logs a trial stopped by Ctrl-C with the traceback of wherever it was: keep its one-line
    "trial failed" message, drop the traceback (the interrupt is the user's, not an error)."""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        record.exc_info = record.exc_text = None
    return True


logging.getLogger("optuna.study._optimize").addFilter(_no_traceback_for_ctrl_c)


# -- objectives: pure functions of an arm's metrics ------------------------------------------------

def defense_objective(detection_rate: float, false_positive_rate: float, attack_success_rate: float,
                      accuracy_drop: float) -> float:
    """DR - FPR - SR - max(AD, 0): 1 is perfect; a defense gains nothing from beating the benign model."""
    return detection_rate - false_positive_rate - attack_success_rate - max(accuracy_drop, 0.0)


def attack_objective(attack_success_rate: float | None, accuracy_drop: float) -> float:
    """The attack's success: its SR, or the accuracy drop for an untargeted attack (no SR)."""
    return accuracy_drop if attack_success_rate is None else attack_success_rate


def objective_value(kind: str, metrics: dict[str, float | None]) -> float:
    if kind == "attack":
        return attack_objective(metrics["attack_success_rate"], metrics["accuracy_drop"])
    # a rule that flags nobody (median, trimmed mean...) has DR = FPR = None: they count 0
    return defense_objective(metrics["detection_rate"] or 0.0, metrics["false_positive_rate"] or 0.0,
                             metrics["attack_success_rate"], metrics["accuracy_drop"])


# -- search spaces: a trial's parameters as config overrides ---------------------------------------

def max_malicious_users(cfg: Config, budget: float) -> int:
    """The most malicious users within ``budget`` (a fraction of the users)."""
    return math.floor(budget * cfg.users.num_users + 1e-9)


def suggest_attack(trial: optuna.Trial, cfg: Config, budget: float) -> list[str]:
    """The configured attack's search space and the number of malicious users, as overrides."""
    overrides = ATTACKS[cfg.attack.name].search_space(trial, cfg)
    users = trial.suggest_int("users.malicious_users", 1, max_malicious_users(cfg, budget))
    return [*overrides, f"users.malicious_fraction={users / cfg.users.num_users!r}"]


def suggest(kind: str, defense: str, trial: optuna.Trial, cfg: Config, budget: float) -> list[str]:
    """A trial's parameters as config overrides: the defense's own search space, or the attack's."""
    if kind == "defense":
        return REGISTRY[defense].search_space(trial, cfg)
    return suggest_attack(trial, cfg, budget)


def baseline_params(kind: str, defense: str, cfg: Config) -> dict:
    """The configured setting as trial parameters: the first trial of a new study."""
    if kind == "defense":
        return REGISTRY[defense].baseline(getattr(cfg.defense, defense), cfg)
    return {**ATTACKS[cfg.attack.name].baseline(cfg),
            "users.malicious_users": max(1, round(cfg.users.malicious_fraction * cfg.users.num_users))}


def warmup_rounds(kind: str, defense: str, cfg: Config) -> int:
    """No pruning before detection can have happened (for AUROR: the largest window searched, or the configured one)."""
    cls, params = REGISTRY[defense], getattr(cfg.defense, defense)
    if kind == "defense":
        return cls.warmup_rounds(params, cfg)
    return max(getattr(params, "window_rounds", 1), ATTACKS[cfg.attack.name].warmup_rounds(cfg))


# -- per-round reporting ----------------------------------------------------------------------------

class TrialReporter(Callback):
    """Reports every round's objective to the trial; raises ``TrialPruned`` when the pruner says so.

    The round's value uses that round's model and the defense's flags so far
    (before detection nobody is flagged: DR = FPR = 0). It measures, so it reads
    who is malicious (``loop.data.malicious``); the defense never does.
    """

    def __init__(self, trial: optuna.Trial, kind: str, benign_accuracy: float) -> None:
        self.trial, self.kind, self.benign_accuracy = trial, kind, benign_accuracy

    def on_round_end(self, loop: CollaborativeLoop, round_: int, metrics: dict[str, float]) -> None:
        self.trial.report(objective_value(self.kind, self.round_metrics(loop, metrics)), round_)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at round {round_}")

    def round_metrics(self, loop: CollaborativeLoop, metrics: dict[str, float]) -> dict[str, float]:
        dr, fpr = defense_detection_rates(type(loop.defense).flags, loop.defense.flagged, loop.excluded,
                                          loop.data.malicious)
        return {**metrics, "detection_rate": dr or 0.0, "false_positive_rate": fpr or 0.0,
                "accuracy_drop": self.benign_accuracy - metrics["accuracy"]}


# -- the study --------------------------------------------------------------------------------------

@dataclass
class StudySpec:
    """What ``auror tune`` was asked for; ``params``/``overrides`` are the base config's source."""

    params: str | None
    overrides: list[str]
    kind: str = "defense"
    defense: str = "auror"  # the defense tuned (kind defense) or attacked (kind attack)
    n_trials: int = 20
    storage: str | None = None  # None: DEFAULT_STORAGE
    study_name: str | None = None
    max_malicious_fraction: float | None = None
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
    if spec.defense not in REGISTRY or spec.defense == "none":
        known = ", ".join(n for n in REGISTRY if n != "none")
        raise ConfigError(f"--defense: must be one of {known}, got {spec.defense!r}")
    check_arms(cfg, [spec.defense])
    if spec.kind == "defense" and not REGISTRY[spec.defense].search_ranges:
        raise ConfigError(f"--defense: {spec.defense} has no parameters to search (tune --kind attack against it)")
    # AUROR's studies of label flipping keep their historical names (defense-digits); the others carry
    # the defense's name, and an attack study the attack's
    attack = [cfg.attack.name] if spec.kind == "attack" and cfg.attack.name != "label_flip" else []
    name = spec.study_name or "-".join([spec.kind, *attack, *([spec.defense] if spec.defense != "auror" else []),
                                        cfg.data.name])
    if not STUDY_NAME.match(name):
        raise ConfigError(f"--study-name: letters, digits, '.', '_' and '-' only, got {name!r}")
    budget = cfg.users.malicious_fraction if spec.max_malicious_fraction is None else spec.max_malicious_fraction
    if not 0 < budget < 0.5:
        raise ConfigError(f"--max-malicious-fraction: must be in (0, 0.5), got {budget!r}")
    if spec.kind == "defense" and round(cfg.users.malicious_fraction * cfg.users.num_users) == 0:
        raise ConfigError(f"users.malicious_fraction: a defense study needs malicious users, got "
                          f"{cfg.users.malicious_fraction!r} of {cfg.users.num_users} users")
    if spec.kind == "attack" and max_malicious_users(cfg, budget) < 1:
        raise ConfigError(f"--max-malicious-fraction: {budget!r} of {cfg.users.num_users} users is less than one user")
    select_device(cfg.training.device)  # a missing GPU is refused before the study starts
    return name, budget


def study_setting(kind: str, defense: str, cfg: Config, budget: float) -> dict:
    """What a study must keep between runs: its kind, defense, base config (bar tracking, report, the device
    (a study may go on on another machine) and the other defenses' sections) and budget."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("tracking", "report")}
    config["training"] = {k: v for k, v in config["training"].items() if k != "device"}
    config["defense"] = {defense: config["defense"][defense]}
    config["attack"] = {k: v for k, v in config["attack"].items() if k not in ATTACKS or k == cfg.attack.name}
    return json.loads(json.dumps({"kind": kind, "defense": defense, "config": config,
                                  "max_malicious_fraction": budget}))


def first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return ""


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a trial of a dead process is failed and retried (same parameters)."""
    sqlalchemy_url = database_url(url, "--storage")
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                with store_lock(url):
                    return optuna.storages.RDBStorage(sqlalchemy_url, heartbeat_interval=HEARTBEAT_S,
                                                      grace_period=GRACE_PERIOD_S,
                                                      heartbeat_stale_trial_callback=retry_stale_trial)
        except sqlalchemy.exc.IntegrityError:  # PostgreSQL: another worker created Optuna's tables at the
            time.sleep(1 + attempt)  # same moment (no lock for a server); they exist now: open them
        except Exception as err:  # SQLAlchemy's errors for a bad URL or an unreachable database
            raise ConfigError(f"--storage: cannot open {url!r}: {str(err).splitlines()[0]}") from None
    raise ConfigError(f"--storage: cannot open {url!r}: its tables are still being created by another worker")


def retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial failed for a stale heartbeat: its MLflow run died with it, and it runs again (the same
    parameters, as a new trial) in whichever worker asks next."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.MlflowClient().set_terminated(run_id, "KILLED")
    log.info("trial %d of a process that died marked FAIL; queued again", trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def open_study(storage: optuna.storages.RDBStorage, name: str, setting: dict, seed: int) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    stored = study.user_attrs.get("setting")
    if stored is None:
        study.set_user_attr("setting", setting)
    elif stored != setting:
        raise ConfigError(f"--study-name {name}: the study was made with another setting "
                          f"({first_difference(stored, setting)}); pick a new --study-name")
    # re-seeded on every resume, so that a continued study does not replay its first samples
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=5)
    return study


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


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
            "git_commit": run_tags(cfg, spec.defense)["git_commit"]}
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


def benign_accuracy(study: optuna.Study, cfg: Config) -> float:
    """The benign arm's accuracy for the study's config: run once, then read from the study."""
    if "benign_accuracy" not in study.user_attrs:
        log.info("benign arm (once per study, for the accuracy drop)")
        study.set_user_attr("benign_accuracy", run_arm(cfg, "benign", [ProgressLogger("benign")]).metrics["accuracy"])
    return study.user_attrs["benign_accuracy"]


class SurplusTrial(Exception):
    """Workers started the study's last trial at the same moment: the later one steps back (FAIL, not run)."""


def claimed_before(study: optuna.Study, number: int) -> int:
    """Trials numbered before ``number`` that finished or are running: they come first in the budget."""
    return sum(t.number < number for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


def run_trials(study: optuna.Study, objective, n_trials: int, poll_s: float = HEARTBEAT_S) -> None:
    """Run trials, one at a time, with any other worker of the study until it has ``n_trials`` finished ones.

    A trial starts only while fewer than ``n_trials`` are finished or running (the
    objective's :func:`claimed_before` settles a tie between workers). While the
    rest are running elsewhere, wait: a trial whose worker dies is failed by its
    stale heartbeat, queued again, and taken over here.
    """
    waiting = False
    while True:
        fail_stale_trials(study)
        finished = count_finished(study)
        if finished >= n_trials:
            return
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished + running >= n_trials:
            if not waiting:
                log.info("study %s: %d finished, %d running elsewhere; waiting for them (a trial whose worker "
                         "dies is taken over)", study.study_name, finished, running)
                waiting = True
            time.sleep(poll_s)
            continue
        waiting = False
        study.optimize(objective, n_trials=1, catch=(SurplusTrial,))


def make_objective(spec: StudySpec, name: str, budget: float, base: Config, benign: float, experiment_id: str,
                   started: list[int]):
    def objective(trial: optuna.Trial) -> float:
        started.append(trial.number)
        if claimed_before(trial.study, trial.number) >= spec.n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study's {spec.n_trials} trials are taken by other workers")
        overrides = suggest(spec.kind, spec.defense, trial, base, budget)
        trial.set_user_attr("overrides", overrides)
        cfg = load_config(spec.params, [*spec.overrides, *overrides])
        tags = {**run_tags(cfg, spec.defense), "optuna_study": name, "optuna_trial": str(trial.number),
                "kind": f"tune-{spec.kind}"}
        with child_run(experiment_id, f"{name}-trial{trial.number}", tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(arm_params(cfg, spec.defense))
            callbacks = [ProgressLogger(f"trial {trial.number}"), MlflowRoundLogger(),
                         TrialReporter(trial, spec.kind, benign), *spec.extra_callbacks]
            metrics = dict(run_arm(cfg, spec.defense, callbacks).metrics)
            metrics["accuracy_drop"] = benign - metrics["accuracy"]
            value = objective_value(spec.kind, metrics)
            trial.set_user_attr("metrics", metrics)
            mlflow.log_metrics({"objective": value, **{k: v for k, v in metrics.items()
                                                       if v is not None and k not in ("accuracy", "attack_success_rate")}})
            mlflow.set_tag("optuna_state", "COMPLETE")
        return value

    return objective


def log_study_plots(study: optuna.Study) -> None:
    """Optimisation history and parameter importances as PNG artifacts of the active (parent) run."""
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = {"optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history}
    if completed >= 2:
        plots["param_importances.png"] = optuna.visualization.matplotlib.plot_param_importances
    else:
        log.info("parameter importances need 2 completed trials (have %d): not plotted", completed)
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message="Some regimes")  # few trials per alpha mode: expected
                ax = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances over a search space with no common parameter
            log.info("%s not plotted: %s", name, err)
            continue
        fig = ax.figure
        fig.tight_layout()
        mlflow.log_figure(fig, name)
        plt.close(fig)


def write_best_params(study: optuna.Study, spec: StudySpec, name: str, reports_dir: str) -> Path | None:
    """The best trial's full config as a params file for ``auror run --params``."""
    try:
        best = study.best_trial
    except ValueError:
        log.info("study %s has no completed trial: no best-params file", name)
        return None
    cfg = load_config(spec.params, [*spec.overrides, *best.user_attrs["overrides"]])
    metrics = best.user_attrs.get("metrics", {})
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)
    path = Path(reports_dir) / f"best_{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Best trial {best.number} of the Optuna study {name} ({spec.kind}): objective {best.value:.4f}\n"
        f"# auror arm: {shown}\n"
        f"# Run it: auror run --params {path}\n"
        + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    )
    return path


TRIAL_METRICS = ("accuracy", "attack_success_rate", "accuracy_drop", "detection_rate", "false_positive_rate")


def write_trials(study: optuna.Study, name: str, reports_dir: str) -> Path:
    """Every finished trial of the study as ``<reports_dir>/trials_<name>.csv``: number, state, objective,
    the searched parameters and the arm's metrics (empty for a pruned trial's); and ``trials_<name>.png``:
    the objective against each searched parameter (pruned trials hollow, at their last reported value)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    rows = [{"trial": t.number, "state": t.state.name, "objective": t.value, **t.params,
             **{m: t.user_attrs.get("metrics", {}).get(m) for m in TRIAL_METRICS}} for t in trials]
    path = Path(reports_dir) / f"trials_{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", "state", "objective", *params, *TRIAL_METRICS])
        writer.writeheader()
        writer.writerows(rows)
    plot_trials(trials, params, path.with_suffix(".png"), name)
    return path


def plot_trials(trials: list, params: list[str], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, len(params), figsize=(2.6 * len(params), 2.8), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], params):
        for state in (TrialState.COMPLETE, TrialState.PRUNED):
            chosen = [t for t in trials if t.state == state and key in t.params and t.value is not None]
            ax.scatter([t.params[key] for t in chosen], [t.value for t in chosen], s=18,
                       facecolors="tab:blue" if state == TrialState.COMPLETE else "none", edgecolors="tab:blue",
                       label=state.name.lower())
        ax.set_xlabel(key.split(".")[-1], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("objective")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: {len(trials)} trials", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_study(spec: StudySpec) -> StudyResult:
    """Create or continue the study, run the missing trials, write the best-params file.

    Raises ``KeyboardInterrupt`` after Ctrl-C, with the running trial marked
    FAIL and the MLflow parent run KILLED.
    """
    base = load_config(spec.params, spec.overrides)
    name, budget = validate_spec(spec, base)
    storage = open_storage(spec.storage or DEFAULT_STORAGE)
    study = open_study(storage, name, study_setting(spec.kind, spec.defense, base, budget), base.seed)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3,
                                               n_warmup_steps=warmup_rounds(spec.kind, spec.defense, base))
    experiment_id = setup_mlflow(base)
    fail_stale_trials(study)
    if not study.trials:
        study.enqueue_trial(baseline_params(spec.kind, spec.defense, base))
    parent_id = start_parent_run(study, experiment_id, name, spec, base)
    started: list[int] = []
    try:
        mlflow.set_tag("n_trials", str(spec.n_trials))
        benign = benign_accuracy(study, base)
        mlflow.log_metric("benign_accuracy", benign)
        finished = count_finished(study)
        remaining = max(spec.n_trials - finished, 0)
        log.info("study %s: %d finished trials of %d, running %d more", name, finished, spec.n_trials, remaining)
        if remaining > 0:
            run_trials(study, make_objective(spec, name, budget, base, benign, experiment_id, started), spec.n_trials)
        log_study_plots(study)
        path = write_best_params(study, spec, name, base.tracking.reports_dir)
        mlflow.log_artifact(str(write_trials(study, name, base.tracking.reports_dir)))
        if path is not None:
            mlflow.log_metric("best_value", study.best_value)
            mlflow.set_tag("best_trial", str(study.best_trial.number))
            mlflow.log_artifact(str(path))
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            fail_running(study, started)
        mlflow.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")
    return StudyResult(study, path, parent_id, spec.storage or DEFAULT_STORAGE)


def fail_running(study: optuna.Study, numbers: list[int]) -> None:
    """Mark FAIL the trials this process started and left running (Optuna already does it
    for an interrupt inside the objective; this covers one between trials)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.number in numbers:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
