"""A server lost in the middle of a command ends it with one stderr line naming the server and the command
that continues, exit 3, no traceback; once the server is back, that command finishes with nothing lost and
no cell run twice. PostgreSQL (the cells' and trials' storage) and an MLflow tracking server, for real, on
127.0.0.1 only."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.servers import as_server_user, auror_command, free_port, postgres_bin, postgres_server, psycopg_missing

pytestmark = [
    pytest.mark.slow,  # servers stopped and started, commands in their own processes
    pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL's initdb/pg_ctl not found (/usr/lib/postgresql/*/bin)"),
    pytest.mark.skipif(psycopg_missing() is not None, reason=psycopg_missing() or ""),
]
SETS = [a for kv in [*TINY, "training.rounds=12"] for a in ("--set", kv)]


def auror(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(auror_command(args), cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """Read the process's stdout until a line holds ``text``; return what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"never printed {text!r}: {''.join(seen)[-2000:]}")


def pg_ctl(base: Path, port: int, action: str) -> None:
    options = ["-o", f"-h 127.0.0.1 -p {port} -k {base / 'pgsock'} -F"] if action == "start" else ["-m", "fast"]
    subprocess.run(as_server_user([str(postgres_bin() / "pg_ctl"), "-D", str(base / "pgdata"), "-l",
                                   str(base / "pg.log"), "-w", *options, action]), check=True, capture_output=True,
                   timeout=120)


def assert_one_line(err: str, start: str) -> None:
    """The error is stderr's last line and its only one: no traceback, no warning (the lines before it are
    Optuna's and MLflow's information of a run going well)."""
    lines = err.splitlines()
    assert lines[-1].startswith(start) and "Traceback" not in err, err
    assert not [line for line in lines[:-1] if line.startswith(("auror:", "[W ", "[E ")) or "ERROR" in line
                or "WARNING" in line], err


@pytest.mark.parametrize("command", ["sweep", "compare", "tune"])
def test_postgresql_stopped_mid_run_is_one_line_exit_3_and_the_rerun_loses_nothing(command, tmp_path):
    with postgres_server(tmp_path / "pg") as pg:
        env = {**os.environ, **pg.env()}
        args = {"sweep": ["sweep", "--grid", "users.malicious_fraction=0.2,0.4", "--arms", "attack", "--no-track",
                          "--sweep-name", "outage"],
                "compare": ["compare", "--arms", "attack", "--attacks", "backdoor", "--no-track", "--sweep-name",
                            "outage"],  # backdoor: two settings, two cells
                "tune": ["tune", "--n-trials", "3", "--study-name", "outage"]}[command]
        args += ["--storage", pg.url, *SETS, "--set", f"tracking.reports_dir={tmp_path}/reports"]
        proc = auror(args, tmp_path, env)
        cells = command != "tune"
        wait_for(proc, "== cell outage" if cells else "[trial 0] round 12/12")
        wait_for(proc, "== cell outage" if cells else "[trial 1] round 10/12")  # the first is recorded
        pg_ctl(tmp_path / "pg", pg.port, "stop")
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 3, err
        assert_one_line(err, f"auror: error: lost the connection to the storage {pg.url} (")
        assert err.endswith("what finished is recorded: run the same command to continue once it is back\n")

        pg_ctl(tmp_path / "pg", pg.port, "start")
        rerun = auror(args, tmp_path, env)
        out, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, err
        import psycopg

        with psycopg.connect(pg.url, password=pg.password) as conn:
            if cells:  # both cells done; the one recorded before the outage never ran again
                rows = conn.execute("SELECT state, attempts FROM auror_cells WHERE sweep = 'outage' "
                                    "ORDER BY attempts").fetchall()
                assert rows == [("done", 1), ("done", 2)]
            else:  # the study ends with its 3 finished trials; the first, finished before the outage, kept
                states = [s for (s,) in conn.execute(
                    "SELECT t.state FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = 'outage' "
                    "ORDER BY t.number").fetchall()]
                assert states[0] == "COMPLETE" and states.count("COMPLETE") + states.count("PRUNED") == 3


def test_a_tracking_server_stopped_mid_run_is_one_line_exit_3_and_the_resume_finishes(tmp_path):
    port = free_port()
    server = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
              "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
              str(tmp_path / "artifacts")]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return proc
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    mlflow_proc = start()
    try:
        args = ["run", "--arms", "benign", "attack", *SETS, "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"]
        run = auror(args, tmp_path, dict(os.environ))
        wait_for(run, "[attack] round 10/12")
        os.killpg(mlflow_proc.pid, signal.SIGTERM)
        mlflow_proc.wait(timeout=60)
        started = time.monotonic()
        _, err = run.communicate(timeout=300)
        assert run.returncode == 3, err
        assert time.monotonic() - started < 120  # seconds of retries, not MLflow's minutes
        assert_one_line(err, f"auror: error: lost the connection to the MLflow tracking server http://127.0.0.1:{port} (")
        resume = err.split("run auror run --resume ")[1].split()[0]

        mlflow_proc = start()
        again = auror(["run", "--resume", resume], tmp_path, dict(os.environ))
        out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err
        import mlflow

        runs = mlflow.MlflowClient(f"http://127.0.0.1:{port}").search_runs(
            [mlflow.MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name("auror").experiment_id])
        assert sorted((r.data.tags["arm"], r.info.status) for r in runs) == [("attack", "FINISHED"),
                                                                              ("benign", "FINISHED")]
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(mlflow_proc.pid, signal.SIGTERM)
        mlflow_proc.wait(timeout=60)
