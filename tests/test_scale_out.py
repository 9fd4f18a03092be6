"""Many workers on one PostgreSQL database and one MLflow server, all real, on 127.0.0.1, and both
letting in only their users: PostgreSQL checks passwords (scram-sha-256), the MLflow server runs
``--app-name basic-auth``. No URL names a password: the workers give PostgreSQL's through PGPASSWORD
(or a PGPASSFILE) and MLflow's through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.

Skipped with the reason when PostgreSQL's binaries (initdb, pg_ctl) or the
psycopg driver are missing; `.ci/run` installs both. The tests that need the
MLflow server are skipped, with the reason, without Flask-WTF (``mlflow[auth]``).
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

from pipeline.core.errors import ConfigError
from pipeline.experiment.storage import database_url
from pipeline.experiment.queue import Sweep
from pipeline.experiment.studies import counted
from tests.conftest import TINY
from tests.servers import (Postgres, auror_command, free_port, mlflow_auth_missing, mlflow_server, postgres_bin,
                           postgres_server, psycopg_missing, throwaway_password, without_credentials)

pytestmark = [
    pytest.mark.slow,  # servers and worker processes
    pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL's initdb/pg_ctl not found (/usr/lib/postgresql/*/bin)"),
    pytest.mark.skipif(psycopg_missing() is not None, reason=psycopg_missing() or ""),
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """The cluster; this process and the workers it starts (they inherit its environment) log in as
    the role ``auror`` with PGPASSWORD."""
    with postgres_server(tmp_path_factory.mktemp("pg")) as pg, pytest.MonkeyPatch.context() as env:
        env.setenv("PGPASSWORD", pg.password)
        yield pg


@pytest.fixture(scope="module")
def tracking(postgres, tmp_path_factory):
    """``mlflow server --app-name basic-auth``, its runs in the cluster; a test that logs to it sets
    :func:`login` (the user ``worker``)."""
    if mlflow_auth_missing():
        pytest.skip(mlflow_auth_missing())
    backend = database_url(new_database(postgres, "mlflow"), "test")
    with mlflow_server(backend, tmp_path_factory.mktemp("mlflow"), env=postgres.env()) as server:
        yield server


def login(monkeypatch, env: dict[str, str]) -> None:
    """This process and the workers it starts use ``env``'s credentials."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def new_database(pg: Postgres, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.database("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.database(name)


def cli(args: list[str]) -> list[str]:
    return auror_command(args)


def auror(args: list[str], tmp: Path, log: str) -> subprocess.Popen:
    """One worker: ``auror`` in its own process, output in ``tmp/<log>``."""
    out = open(tmp / log, "w")
    return subprocess.Popen(cli(args), cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def refused(args: list[str], tmp: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """``auror`` with ``env`` only (bar PYTHONPATH), expected to stop at once; the result and its wall time."""
    start = time.monotonic()
    done = subprocess.run(cli(args), cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(ROOT)})
    return done, time.monotonic() - start


def one_error_line(done: subprocess.CompletedProcess, prefix: str) -> str:
    """The run exited 2 with one stderr line starting ``prefix``, and no traceback anywhere."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), done.stderr[-3000:]
    return lines[0]


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
    assert database_url(postgres.url, "--storage").startswith(f"postgresql+psycopg://{postgres.user}@127.0.0.1:")


def test_two_workers_on_one_study_finish_exactly_n_trials(postgres, tmp_path):
    storage = new_database(postgres, "tune_two")
    logs = ["a.log", "b.log"]
    procs = [auror(tune_args(tmp_path, storage, 5), tmp_path, log) for log in logs]
    finish(procs, tmp_path, logs)
    study = load(storage)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    # 5 that count; a trial that proposed a finished one's config took its value and ran nothing
    assert sum(map(counted, finished)) == 5
    assert all(t.user_attrs["same_as"] < t.number for t in finished if not counted(t))
    # each trial draws from the study's seed plus its number: the workers proposed apart (a float knob)
    proposed = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(proposed)) == len(proposed) == 5
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
    assert sum(map(counted, finished)) == 3
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


def test_a_sweep_split_over_two_workers_runs_every_cell_once_and_logs_to_one_mlflow_server(postgres, tracking,
                                                                                            tmp_path, monkeypatch):
    storage = new_database(postgres, "sweep_two")
    login(monkeypatch, tracking.env())
    server = tracking.url
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


# --- only their users: a worker without the password is refused in one line, and no password is left behind


def no_password(tmp: Path) -> dict[str, str]:
    """This process's environment without any password: no PGPASSWORD, a PGPASSFILE that is not
    there (not this user's ~/.pgpass), no MLflow credentials."""
    return {**without_credentials(os.environ), "PGPASSFILE": str(tmp / "absent.pgpass")}


def test_the_cluster_lets_in_only_its_users_and_only_on_loopback(postgres, tmp_path, monkeypatch):
    import psycopg

    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "absent.pgpass"))
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(postgres.url, connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.url, password=throwaway_password("wrong"), connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):  # the superuser too
        psycopg.connect(postgres.database("postgres").replace(postgres.user, "postgres", 1),
                        password=throwaway_password("wrong"), connect_timeout=10)
    monkeypatch.setenv("PGPASSFILE", str(postgres.pgpass(tmp_path / "pgpass")))  # ~/.pgpass-style
    with psycopg.connect(postgres.url, connect_timeout=10) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SELECT current_user").fetchone() == (postgres.user,)


def test_database_errors_show_no_password():
    password = throwaway_password("url")
    for url in (f"postgresql://auror:{password}@127.0.0.1:5432/",  # no database name
                f"postgresql://auror:{password}@127.0.0.1:port/auror",  # not a URL
                f"mysql://auror:{password}@127.0.0.1/auror"):  # not a backend of ours
        with pytest.raises(ConfigError) as err:
            database_url(url, "--storage")
        assert password not in str(err.value) and "auror:***@" in str(err.value), str(err.value)


@pytest.mark.parametrize("case", ["missing", "wrong PGPASSWORD", "wrong password in the URL"])
def test_a_worker_without_the_database_password_is_refused_in_one_line(postgres, tmp_path, case):
    env, storage, wrong = no_password(tmp_path), postgres.url, throwaway_password("wrong")
    if case == "wrong PGPASSWORD":
        env["PGPASSWORD"] = wrong
    elif case == "wrong password in the URL":
        storage = storage.replace(f"{postgres.user}@", f"{postgres.user}:{wrong}@")
    done, _ = refused(sweep_args(tmp_path, storage, []), tmp_path, env)
    line = one_error_line(done, "auror: error: --storage:")
    assert ("no password supplied" if case == "missing" else "password authentication failed") in line, line
    assert wrong not in done.stdout + done.stderr
    if case == "wrong password in the URL":
        assert f"{postgres.user}:***@127.0.0.1" in line, line
    assert "== cell" not in done.stdout and not (tmp_path / "reports").exists()  # nothing ran


def run_args(tmp: Path, uri: str, experiment: str, arms: list[str]) -> list[str]:
    return ["run", "--arms", *arms, *sets([*TINY, f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}",
                                           f"tracking.reports_dir={tmp}/reports",
                                           f"tracking.artifact_dir={tmp}/mlruns/artifacts"])]


@pytest.mark.parametrize("case", ["missing", "wrong password", "unreachable"])
def test_a_run_without_the_tracking_servers_credentials_is_refused_in_one_line_before_training(tracking, tmp_path,
                                                                                               case, monkeypatch):
    import requests

    from pipeline.experiment.tracking import SERVER_CHECK_S, check_tracking_server

    env, uri, wrong = no_password(tmp_path), tracking.url, throwaway_password("wrong")
    if case == "wrong password":
        env.update(tracking.env(), MLFLOW_TRACKING_PASSWORD=wrong)
    elif case == "unreachable":
        env.update(tracking.env())
        uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done, wall = refused(run_args(tmp_path, uri, "refused", ["benign"]), tmp_path, env)
    line = one_error_line(done, "auror: error: tracking.tracking_uri: ")
    assert uri in line, line
    if case == "unreachable":
        assert "cannot reach" in line and "Connection refused" in line, line
    else:
        assert "401" in line and "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line, line
    assert wrong not in done.stdout + done.stderr and tracking.password not in done.stdout + done.stderr
    # before any training, and without MLflow's minutes of retries (the wall time is mostly Python's imports)
    assert "round" not in done.stdout and not (tmp_path / "reports" / "latest.json").exists(), done.stdout
    assert wall < 60, wall
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):  # the check alone
        monkeypatch.delenv(key, raising=False)
    login(monkeypatch, {k: v for k, v in env.items() if k.startswith("MLFLOW_TRACKING_")})
    start = time.monotonic()
    with pytest.raises(ConfigError, match="^tracking.tracking_uri: ") as err:
        check_tracking_server(uri, "refused")
    assert time.monotonic() - start < SERVER_CHECK_S + 1 and f"auror: error: {err.value}" == line
    answer = requests.get(f"{tracking.url}/api/2.0/mlflow/experiments/get-by-name", timeout=10,
                          params={"experiment_name": "refused"},
                          auth=(tracking.admin_username, tracking.admin_password))
    assert answer.status_code == 404  # no experiment made, hence no run


def test_no_password_is_left_anywhere_a_run_goes(postgres, tracking, tmp_path, monkeypatch):
    """``auror run`` and ``auror sweep`` on the servers, the database password from a PGPASSFILE (no
    PGPASSWORD), MLflow's from the environment: neither password (nor the admin's, nor a basic-auth
    header made from them) is in the output, the reports, the local files, the sweep's table, or the
    runs' MLflow params, tags and artifacts."""
    import base64

    env = {**no_password(tmp_path), "PGPASSFILE": str(postgres.pgpass(tmp_path / "pgpass")), **tracking.env()}
    storage = new_database(postgres, "leak")
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    outputs = []
    for folder, args in ((run_dir, run_args(run_dir, tracking.url, "leak", ["benign", "attack", "auror"])),
                         (sweep_dir, ["sweep", "--grid", "users.malicious_fraction=0.4", "--arms", "attack", "auror",
                                      "--seeds", "0", "--storage", storage, "--sweep-name", "leak",
                                      *sets([*TINY, f"tracking.tracking_uri={tracking.url}", "tracking.experiment=leak",
                                             f"tracking.reports_dir={sweep_dir}/reports"])])):
        folder.mkdir()
        done = subprocess.run(cli(args), cwd=folder, capture_output=True, text=True, timeout=600,
                              env={**env, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        outputs += [done.stdout, done.stderr]
    assert (run_dir / "reports" / "latest.json").is_file() and (sweep_dir / "reports" / "leak.md").is_file()

    login(monkeypatch, tracking.env())
    mlflow.set_tracking_uri(tracking.url)
    runs = mlflow.search_runs(experiment_names=["leak"], output_format="list")
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}  # 3 arms run, 2 swept
    texts = list(outputs)
    for r in runs:
        texts += [json.dumps(r.data.params), json.dumps(r.data.tags)]
        local = Path(mlflow.artifacts.download_artifacts(run_id=r.info.run_id,
                                                         dst_path=str(tmp_path / "dl" / r.info.run_id)))
        assert {"config.json", "detection.json"} <= {p.name for p in local.rglob("*")}
    texts.append(json.dumps(Sweep(storage, "leak").rows(), default=str))
    files = [f for folder in (run_dir, sweep_dir, tmp_path / "dl") for f in folder.rglob("*") if f.is_file()]
    assert any(f.suffix == ".md" for f in files) and any(f.name == "config.json" for f in files)

    for user, password in ((postgres.user, postgres.password), (tracking.username, tracking.password),
                           (tracking.admin_username, tracking.admin_password)):
        header = base64.b64encode(f"{user}:{password}".encode()).decode()
        for secret in (password, header):
            assert not [t for t in texts if secret in t], f"{user}'s password is in the output, params or tags"
            leaked = [str(f) for f in files if secret.encode() in f.read_bytes()]
            assert not leaked, f"{user}'s password is in {leaked}"


@pytest.mark.parametrize("command", ["sweep", "compare", "tune"])
def test_every_command_refuses_missing_tracking_credentials_before_its_first_cell_or_trial(tracking, tmp_path,
                                                                                          command):
    """The check runs once, before work: a sweep, a comparison or a study without the tracking server's
    credentials is exit 2 and one line, with no cell run and no study made."""
    sets_ = sets([*TINY, f"tracking.tracking_uri={tracking.url}", f"tracking.reports_dir={tmp_path}/reports",
                  f"tracking.artifact_dir={tmp_path}/mlruns/artifacts"])
    storage = ["--storage", f"sqlite:///{tmp_path}/db.sqlite"]
    args = {"sweep": ["sweep", "--grid", "users.malicious_fraction=0.2,0.4", "--arms", "attack"],
            "compare": ["compare", "--arms", "attack", "--attacks", "label_flip"],
            "tune": ["tune", "--n-trials", "1"]}[command]
    done, _ = refused([*args, *storage, *sets_], tmp_path, no_password(tmp_path))
    one_error_line(done, "auror: error: tracking.tracking_uri: ")
    assert "== cell" not in done.stdout and "A new study" not in done.stderr
