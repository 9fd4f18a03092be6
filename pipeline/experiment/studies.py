"""An Optuna study's storage and lifecycle, shared by the workers of one study: the RDB storage with
heartbeats (a dead worker's trial is failed and queued again), the study's recorded setting, and
the loop that runs trials until the study's budget of finished trials is reached."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings

import mlflow
import optuna
import sqlalchemy
from optuna.trial import TrialState

from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.experiment import storage
from pipeline.experiment.config import Config, ConfigError, first_difference
from pipeline.experiment.storage import HEARTBEAT_S, database_url, hide_password, scrub, store_lock

log = logging.getLogger("auror")

MAX_RETRIES = 3  # a trial whose worker died runs again at most this often
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards n_trials


def _no_traceback_for_ctrl_c(record: logging.LogRecord) -> bool:
    """Optuna logs a trial stopped by Ctrl-C with the traceback of wherever it was: keep its one-line
    "trial failed" message, drop the traceback (the interrupt is the user's, not an error). A trial
    stopped by a lost storage is not logged at all: the command says it in one line (exit 3)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, sqlalchemy.exc.SQLAlchemyError):
        return False
    if isinstance(error, KeyboardInterrupt):
        record.exc_info = record.exc_text = None
    return True


logging.getLogger("optuna.study._optimize").addFilter(_no_traceback_for_ctrl_c)
# Optuna's storage warns of a failed query before it retries it: a lost storage is the command's one line, not a
# warning per try (its fallback for too many IN variables goes unsaid too)
logging.getLogger("optuna.storages._rdb.storage").addFilter(
    lambda record: not record.getMessage().startswith("Caught an error from sqlalchemy"))


def study_setting(kind: str, defense: str, cfg: Config, budget: float) -> dict:
    """What a study must keep between runs: its kind, defense, base config (bar tracking, report, the device
    (a study may go on on another machine) and the other defenses' sections) and budget."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("tracking", "report")}
    config["training"] = {k: v for k, v in config["training"].items() if k != "device"}
    config["defense"] = {part: config["defense"][part] for part in defense.split("+")}  # (a composition's parts)
    config["attack"] = {k: v for k, v in config["attack"].items() if k not in ATTACKS or k == cfg.attack.name}
    return json.loads(json.dumps({"kind": kind, "defense": defense, "config": config,
                                  "max_malicious_fraction": budget}))


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a trial of a dead process is failed and retried (same parameters)."""
    sqlalchemy_url = database_url(url, "--storage")
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                with store_lock(url):
                    return optuna.storages.RDBStorage(sqlalchemy_url, heartbeat_interval=HEARTBEAT_S,
                                                      grace_period=storage.GRACE_PERIOD_S,
                                                      heartbeat_stale_trial_callback=retry_stale_trial)
        except Exception as err:
            if storage.created_meanwhile(err):  # PostgreSQL: another worker created Optuna's tables at the
                time.sleep(1 + attempt)  # same moment; they exist now: open them
                continue
            # SQLAlchemy's errors for a bad URL or an unreachable database
            raise ConfigError(f"--storage: cannot open {hide_password(url)!r}: "
                              f"{scrub(str(err).splitlines()[0], url)}") from None
    raise ConfigError(f"--storage: cannot open {hide_password(url)!r}: its tables are still being created by "
                      "another worker")


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


def check_setting(study: optuna.Study, name: str, setting: dict, elsewhere: str = "pick a new --study-name") -> None:
    """A study is continued, or read, under the setting it was made with only (else: go ``elsewhere``)."""
    stored = study.user_attrs.get("setting")
    if stored is not None and stored != setting:
        raise ConfigError(f"study {name}: made with another setting ({first_difference(stored, setting)}); "
                          f"{elsewhere}")


def open_study(storage: optuna.storages.RDBStorage, name: str, setting: dict, seed: int) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    check_setting(study, name, setting)
    if study.user_attrs.get("setting") is None:
        study.set_user_attr("setting", setting)
    study.sampler = TrialSeededTPE(seed)
    return study


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose draws for trial ``n`` come from ``seed + n``: workers of one study do not propose alike
    (each opens the study with the same trials), and a continued study does not replay its first draws."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)

    def before_trial(self, study, trial) -> None:
        self.tpe = optuna.samplers.TPESampler(seed=self.seed + trial.number, n_startup_trials=5)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.tpe.after_trial(study, trial, state, values)


REPEATS_CAP = 3  # a study asks at most this many times its budget (a sampler that proposes tried settings only)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts in the budget: not one that took the value of a trial of the same config."""
    return "same_as" not in trial.user_attrs


def searched(study: optuna.Study, n_trials: int) -> bool:
    """Whether the study is done: ``n_trials`` finished trials that count, or ``REPEATS_CAP`` x as many in all."""
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    return sum(map(counted, finished)) >= n_trials or len(finished) >= REPEATS_CAP * n_trials


def count_finished(study: optuna.Study) -> int:
    """The finished trials that count in the budget (a repeated config does not)."""
    return sum(map(counted, study.get_trials(deepcopy=False, states=FINISHED)))


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class SurplusTrial(Exception):
    """Workers started the study's last trial at the same moment: the later one steps back (FAIL, not run)."""


def claimed_before(study: optuna.Study, number: int) -> int:
    """Trials numbered before ``number`` that finished (and count) or are running: they come first in the budget."""
    return sum(t.number < number and counted(t)
               for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


def earlier_baseline(study: optuna.Study, number: int) -> bool:
    """Whether a configured-setting trial numbered before ``number`` is queued, running or finished."""
    return any(t.number < number and t.user_attrs.get("baseline") and t.state != TrialState.FAIL
               for t in study.get_trials(deepcopy=False))


def run_trials(study: optuna.Study, objective, n_trials: int, poll_s: float = HEARTBEAT_S) -> None:
    """Run trials, one at a time, with any other worker of the study until it has ``n_trials`` finished ones
    that count (:func:`counted`), or ``REPEATS_CAP`` times as many in all.

    A trial starts only while fewer than ``n_trials`` are finished or running (the
    objective's :func:`claimed_before` settles a tie between workers). While the
    rest are running elsewhere, wait: a trial whose worker dies is failed by its
    stale heartbeat, queued again, and taken over here.
    """
    waiting = False
    while True:
        fail_stale_trials(study)
        finished = count_finished(study)
        if searched(study, n_trials):
            if finished < n_trials:
                log.info("study %s: %d trials asked, %d of them settings not tried before: the sampler proposes "
                         "tried ones only", study.study_name, REPEATS_CAP * n_trials, finished)
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


def fail_running(study: optuna.Study, numbers: list[int]) -> None:
    """Mark FAIL the trials this process started and left running (Optuna already does it
    for an interrupt inside the objective; this covers one between trials)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.number in numbers:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
