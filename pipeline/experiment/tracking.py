"""MLflow tracking: one run per arm, per-round metrics with ``step=round``."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import mlflow
import requests

from pipeline.experiment.arms import make_attack
from pipeline.experiment.config import Config
from pipeline.experiment.grid import code_version
from pipeline.experiment.storage import hide_password, store_lock
from pipeline.core.device import describe_device, select_device
from pipeline.core.errors import ConfigError
from pipeline.core.loop import Callback, CollaborativeLoop

log = logging.getLogger("auror")
SERVER_CHECK_S = 5  # the one request that checks a tracking server: no answer in this time is an error
CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


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
    ``--artifacts-destination``), so every worker's artifacts are in one place; the server is
    checked first (:func:`check_tracking_server`)."""
    uri = cfg.tracking.tracking_uri
    if uri.startswith(("http://", "https://")):
        check_tracking_server(uri, cfg.tracking.experiment)
    mlflow.set_tracking_uri(absolute_uri(uri))
    with store_lock(uri):
        return _experiment_id(cfg, uri)


def check_tracking_server(uri: str, experiment: str) -> None:
    """A one-line :class:`ConfigError` naming ``tracking.tracking_uri`` unless the tracking server at
    ``uri`` answers and accepts this client's credentials: one request (the experiment by name), with
    MLflow's own credentials (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or a token),
    no retries, at most :data:`SERVER_CHECK_S` seconds, instead of MLflow's minutes of retries. The
    message shows no password."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri.rstrip("/"))
    server = f"the MLflow tracking server {hide_password(uri)}"
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/get-by-name", "GET", max_retries=0,
                                raise_on_status=False, timeout=SERVER_CHECK_S, params={"experiment_name": experiment})
    except MlflowException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, requests.exceptions.Timeout):
            reason = f"no answer in {SERVER_CHECK_S} s"
        else:
            found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(cause or err))
            reason = found.group(0) if found else type(cause or err).__name__
        raise ConfigError(f"tracking.tracking_uri: cannot reach {server} ({reason}); is it running there, "
                          f"and is the address right?") from None
    code = response.status_code
    if code == 401:
        if creds.username and creds.password:
            raise ConfigError(f"tracking.tracking_uri: {server} refused user {creds.username!r} (401: wrong "
                              f"user name or password): check {CREDENTIALS}")
        if creds.token:
            raise ConfigError(f"tracking.tracking_uri: {server} refused the token (401): check MLFLOW_TRACKING_TOKEN "
                              f"or set {CREDENTIALS}")
        raise ConfigError(f"tracking.tracking_uri: {server} needs credentials (401: none given): "
                          f"set {CREDENTIALS}")
    if code == 403:
        raise ConfigError(f"tracking.tracking_uri: {server} does not let user {creds.username!r} read the "
                          f"experiment {experiment!r} (403 Forbidden): ask its admin for a permission on it")
    try:
        missing = code == 404 and response.json().get("error_code") == "RESOURCE_DOES_NOT_EXIST"
    except (ValueError, AttributeError):  # not JSON, or not an object: not MLflow's answer
        missing = False
    if code >= 500:
        raise ConfigError(f"tracking.tracking_uri: {server} answered HTTP {code} to "
                          f"/api/2.0/mlflow/experiments/get-by-name (a server error: see the server's log)")
    if code != 200 and not missing:
        raise ConfigError(f"tracking.tracking_uri: {server} answered HTTP {code} to "
                          f"/api/2.0/mlflow/experiments/get-by-name; is it an MLflow tracking server?")


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
            accuracy, success = metrics["accuracy"], metrics["attack_success_rate"]
            log.info("  [%s] round %d/%d  accuracy %s  attack success %s  (%.0f s)", self.arm, round_, loop.rounds,
                     "-" if accuracy is None else f"{accuracy:.3f}", "-" if success is None else f"{success:.3f}",
                     now - self.started)
