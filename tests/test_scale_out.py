"""Many workers on one PostgreSQL database and one MLflow server, all real, on 127.0.0.1.

Skipped with the reason when PostgreSQL's binaries (initdb, pg_ctl) or the
psycopg driver are missing; `.ci/run` installs both.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.experiment.storage import database_url
from pipeline.experiment.queue import Sweep
from tests.conftest import TINY
from tests.servers import mlflow_server, postgres_bin, postgres_server, psycopg_missing

pytestmark = [
    pytest.mark.slow,  # servers and worker processes
    pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL's initdb/pg_ctl not found (/usr/lib/postgresql/*/bin)"),
    pytest.mark.skipif(psycopg_missing() is not None, reason=psycopg_missing() or ""),
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg")) as url:
        yield url


def new_database(url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(url.replace("/auror", "/postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.replace("/auror", f"/{name}")


def auror(args: list[str], tmp: Path, log: str) -> subprocess.Popen:
    """One worker: ``auror`` in its own process, output in ``tmp/<log>``."""
    out = open(tmp / log, "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline.experiment.cli", *args], cwd=tmp, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def finish(procs: list[subprocess.Popen], tmp: Path, logs: list[str], timeout: float = 300) -> None:
    for proc, log in zip(procs, logs):
        proc.wait(timeout)
        assert proc.returncode == 0, (tmp / log).read_text()[-3000:]


def sets(overrides: list[str]) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


def tune_args(tmp: Path, storage: str, n_trials: int, extra: list[str] = ()) -> list[str]:
    return ["tune", "--storage", storage, "--study-name", "shared", "--n-trials", str(n_trials),
            *sets([*TINY, *extra, f"tracking.tracking_uri=sqlite:///{tmp}/mlruns/mlflow.db",
                   f"tracking.artifact_dir={tmp}/mlruns/artifacts", f"tracking.reports_dir={tmp}/reports"])]


def load(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="shared", storage=database_url(storage, "test"))


def test_a_postgres_url_is_used_through_psycopg(postgres):
    assert database_url(postgres, "--storage").startswith("postgresql+psycopg://postgres@127.0.0.1:")


def test_two_workers_on_one_study_finish_exactly_n_trials(postgres, tmp_path):
    storage = new_database(postgres, "tune_two")
    logs = ["a.log", "b.log"]
    procs = [auror(tune_args(tmp_path, storage, 5), tmp_path, log) for log in logs]
    finish(procs, tmp_path, logs)
    study = load(storage)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 5
    # a worker that lost the race for the last trial stepped back before running it
    assert all(t.user_attrs.get("surplus") for t in study.get_trials(states=(TrialState.FAIL,)))
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # one parent run for the study, every trial's run under it
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["auror"], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("kind") == "tune-defense"]
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
    trials = [r for r in runs if "optuna_trial" in r.data.tags]
    assert len(trials) >= 5 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}


def test_a_killed_worker_trial_is_failed_and_retried_by_the_survivor(postgres, tmp_path):
    storage = new_database(postgres, "tune_kill")
    slow = ["training.rounds=30"]  # trials of a few seconds: time to kill one in the middle
    victim = auror(tune_args(tmp_path, storage, 3, slow), tmp_path, "victim.log")
    deadline = time.monotonic() + 120
    while True:
        try:
            running = load(storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        if running:
            break
        assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "victim.log").read_text()[-3000:]
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    killed = running[0].number
    survivor = auror(tune_args(tmp_path, storage, 3, slow), tmp_path, "survivor.log")
    finish([survivor], tmp_path, ["survivor.log"], timeout=400)

    study = load(storage)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.number == killed
    retried = [t for t in finished if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == failed.params  # the same parameters, run once more
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert "marked FAIL; queued again" in (tmp_path / "survivor.log").read_text()


def sweep_args(tmp: Path, storage: str, extra: list[str]) -> list[str]:
    return ["sweep", "--grid", "users.malicious_fraction=0.2,0.4", "--arms", "benign", "attack", "median",
            "--seeds", "0", "1", "--storage", storage, "--sweep-name", "grid",
            *sets([*TINY, *extra, f"tracking.reports_dir={tmp}/reports"])]


def test_a_sweep_split_over_two_workers_runs_every_cell_once_and_logs_to_one_mlflow_server(postgres, tmp_path):
    storage = new_database(postgres, "sweep_two")
    backend = new_database(postgres, "mlflow_two")
    with mlflow_server(database_url(backend, "test"), tmp_path / "artifacts", tmp_path / "mlflow.log") as server:
        tracked = [f"tracking.tracking_uri={server}", "tracking.experiment=shared"]
        logs = ["a.log", "b.log"]
        procs = [auror(sweep_args(tmp_path, storage, tracked), tmp_path, log) for log in logs]
        finish(procs, tmp_path, logs)

        rows = Sweep(storage, "grid").rows()
        assert len(rows) == 10  # benign once per seed, attack and median per fraction and seed
        assert {r["state"] for r in rows} == {"done"} and all(r["attempts"] == 1 for r in rows)
        assert len({r["worker"] for r in rows}) == 2

        mlflow.set_tracking_uri(server)
        runs = mlflow.search_runs(experiment_names=["shared"], output_format="list")
        assert len(runs) == 10 and {r.info.status for r in runs} == {"FINISHED"}
        attack = next(r for r in runs if r.data.tags["arm"] == "attack")
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(attack.info.run_id)}
        assert artifacts, "the run's artifacts are listed through the server"
        local = mlflow.artifacts.download_artifacts(run_id=attack.info.run_id, dst_path=str(tmp_path / "dl"))
        assert any(Path(local).rglob("*")), "and downloaded through it"

    # one worker on SQLite gives the same table
    single = tmp_path / "single"
    single.mkdir()
    one = auror(sweep_args(single, f"sqlite:///{single}/sweeps.db", []) + ["--no-track"], single, "one.log")
    finish([one], single, ["one.log"])
    assert json.loads((single / "reports" / "grid.json").read_text()) == \
        json.loads((tmp_path / "reports" / "grid.json").read_text())
