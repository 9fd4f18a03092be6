"""Sweeps: cells claimed from a shared table (SQLite here; tests/test_scale_out.py runs PostgreSQL)."""

import json
import multiprocessing
import time

import pytest

from pipeline.experiment import storage
from pipeline.experiment.cli import main
from pipeline.experiment.config import ConfigError, load_config
from pipeline.experiment.grid import Cell, expand, parse_grid
from pipeline.experiment.queue import Sweep, work
from pipeline.experiment.storage import database_url
from tests.conftest import TINY


def cells(n: int, config: str = "h") -> list[Cell]:
    return [Cell("attack", f"setting {i}", 0, f"attack|seed 0|{config}{i}", None) for i in range(n)]


def slow_cell(cell: Cell) -> dict:
    time.sleep(0.2)
    return {"accuracy": float(cell.key[-1])}


def worker(url: str, n: int) -> None:
    work(Sweep(url, "s"), cells(n), slow_cell)


@pytest.mark.slow
def test_two_worker_processes_split_the_cells_and_run_each_once(tmp_path):
    url = f"sqlite:///{tmp_path}/sweeps.db"
    Sweep(url, "s")  # the table exists before the two workers race for cells
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(url, 8)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = Sweep(url, "s").rows()
    assert len(rows) == 8 and {r["state"] for r in rows} == {"done"}
    assert all(r["attempts"] == 1 for r in rows)  # never run twice
    assert len({r["worker"] for r in rows}) == 2  # both worked
    assert {r["key"]: r["result"]["accuracy"] for r in rows} == {c.key: float(c.key[-1]) for c in cells(8)}


def test_a_finished_cell_is_never_rerun_and_a_new_config_is_a_new_cell(tmp_path):
    s = Sweep(f"sqlite:///{tmp_path}/sweeps.db", "s")
    ran = []
    assert work(s, cells(3), lambda c: ran.append(c.key) or {}) == 3
    assert work(s, cells(3), lambda c: ran.append(c.key) or {}) == 0
    assert work(s, cells(3, config="other"), lambda c: ran.append(c.key) or {}) == 3
    assert len(ran) == len(set(ran)) == 6


def test_the_cell_of_a_dead_worker_is_taken_over_once_its_heartbeat_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "GRACE_PERIOD_S", 1.0)
    s = Sweep(f"sqlite:///{tmp_path}/sweeps.db", "s")
    todo = cells(2)
    s.add(todo)
    dead = s.claim("dead-host:1", [c.key for c in todo])  # claimed, then its worker never beats again
    ran = []
    start = time.monotonic()
    work(s, todo, lambda c: ran.append(c.key) or {}, poll_s=0.1)
    assert sorted(ran) == sorted(c.key for c in todo) and dead in ran
    assert time.monotonic() - start >= 0.9  # it waited for the heartbeat to go stale
    assert {r["key"]: r["attempts"] for r in s.rows()}[dead] == 2


def test_a_running_cell_of_a_live_worker_is_left_to_it(tmp_path):
    s = Sweep(f"sqlite:///{tmp_path}/sweeps.db", "s")
    todo = cells(1)
    s.add(todo)
    key = s.claim("live-host:1", [todo[0].key])
    assert s.claim("other-host:2", [todo[0].key]) is None
    s.finish(key, "live-host:1", {"accuracy": 1.0})
    assert s.results() == {key: {"accuracy": 1.0}}


def test_a_failing_cell_is_recorded_and_retried_by_the_next_command(tmp_path):
    s = Sweep(f"sqlite:///{tmp_path}/sweeps.db", "s")

    def boom(cell):
        raise ValueError("NaN in the update")

    work(s, cells(1), boom)
    (row,) = s.rows()
    assert row["state"] == "failed" and row["result"] == "ValueError: NaN in the update"
    assert work(s, cells(1), lambda c: {"accuracy": 0.5}) == 1
    assert s.results() == {row["key"]: {"accuracy": 0.5}}


def test_grid_settings_are_the_product_of_the_values():
    settings = parse_grid(["users.malicious_fraction=0.1,0.3", "training.hidden_sizes=[16],[8,8]"])
    assert [s.label for s in settings] == [
        "users.malicious_fraction=0.1, training.hidden_sizes=[16]",
        "users.malicious_fraction=0.1, training.hidden_sizes=[8,8]",
        "users.malicious_fraction=0.3, training.hidden_sizes=[16]",
        "users.malicious_fraction=0.3, training.hidden_sizes=[8,8]",
    ]
    with pytest.raises(ConfigError, match="--grid: expected KEY=V1,V2"):
        parse_grid(["users.malicious_fraction"])


@pytest.mark.parametrize("grid, message", [
    (["seed=0,1"], "--grid: seed is not a grid axis; give the seeds with --seeds 0 1"),
    (["users.malicious_fraction=0.1", "users.malicious_fraction=0.2"],
     "--grid: users.malicious_fraction is given twice; list all its values once"),
    (["defense.auror.tau=0.1,0.1"], "--grid: defense.auror.tau=0.1 is given twice"),
])
def test_a_grid_that_would_mislabel_its_columns_is_refused(grid, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        parse_grid(grid)


def test_two_values_of_one_config_are_refused_before_any_cell():
    base = load_config(None, TINY)
    with pytest.raises(ConfigError, match=r"^--grid: 'users.malicious_fraction=0.2' and 'users.malicious_fraction=0.20' "
                                          "are the same config"):
        expand(base, parse_grid(["users.malicious_fraction=0.2,0.20"]), [0], ["attack"])


def test_the_benign_arm_is_one_cell_for_settings_that_differ_in_who_attacks():
    planned = expand(load_config(None, TINY), parse_grid(["users.malicious_fraction=0.2,0.4"]), [0, 1],
                     ["benign", "attack"])
    assert len(planned) == 8
    assert len({c.key for c in planned if c.arm == "benign"}) == 2  # one per seed
    assert len({c.key for c in planned if c.arm == "attack"}) == 4


@pytest.mark.parametrize("url, message", [
    ("mysql://x", "--storage: expected sqlite:///<file> or postgresql://"),
    ("postgresql://u@127.0.0.1:1/db", "--storage: postgresql needs the PostgreSQL driver: pip install -e '.[postgres]'"),
])
def test_bad_storage_urls_are_refused_in_one_line(url, message, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        database_url(url, "--storage")


@pytest.mark.parametrize("setting, message", [
    ("data.name=mnist", "auror: error: MNIST not found under"),  # data.root: an empty folder
    ("users.min_samples=1000", "auror: error: users.num_users: 5 users leave one with"),
])
def test_a_sweep_whose_cells_would_all_fail_on_their_data_claims_none(setting, message, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    (tmp_path / "nodata").mkdir()
    args = ["sweep", "--grid", "users.malicious_fraction=0.2,0.4", "--arms", "attack", "--seeds", "0", "--no-track",
            "--storage", f"sqlite:///{tmp_path}/s.db", "--sweep-name", "nodata", *[a for kv in TINY for a in ("--set", kv)],
            "--set", f"data.root={tmp_path / 'nodata'}", "--set", "data.download=false", "--set", setting]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert Sweep(f"sqlite:///{tmp_path}/s.db", "nodata").rows() == []  # no cell claimed, none marked failed
    assert not (tmp_path / "reports").exists()


def test_auror_sweep_runs_a_grid_and_reports_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--grid", "users.malicious_fraction=0.2,0.4", "--arms", "benign", "attack", "median",
            "--seeds", "0", "--no-track", "--storage", f"sqlite:///{tmp_path}/s.db", "--sweep-name", "frac",
            *[a for kv in TINY for a in ("--set", kv)], "--set", f"tracking.reports_dir={tmp_path}/reports"]
    assert main(args) == 0
    table = json.loads((tmp_path / "reports" / "frac.json").read_text())["results"]["label_flip"]
    assert set(table) == {"benign", "attack", "median"}
    assert set(table["attack"]) == {"users.malicious_fraction=0.2", "users.malicious_fraction=0.4"}
    assert table["benign"]["users.malicious_fraction=0.2"] == table["benign"]["users.malicious_fraction=0.4"]
    assert (tmp_path / "reports" / "frac.png").stat().st_size > 0
    assert "| median |" in capsys.readouterr().out
    rows = Sweep(f"sqlite:///{tmp_path}/s.db", "frac").rows()
    assert len(rows) == 5 and {r["state"] for r in rows} == {"done"}  # benign shared: 1 + 2 + 2
    assert main(args) == 0  # everything finished: nothing runs again
    assert all(r["attempts"] == 1 for r in Sweep(f"sqlite:///{tmp_path}/s.db", "frac").rows())


def test_sweep_report_only_reads_the_finished_cells_runs_none_and_lists_the_missing(tmp_path, monkeypatch, capsys):
    """A long sweep's report midway: the cells of a smaller grid, read by the full grid with --report-only."""
    monkeypatch.chdir(tmp_path)
    common = ["--arms", "benign", "attack", "--seeds", "0", "--no-track", "--storage", f"sqlite:///{tmp_path}/s.db",
              "--sweep-name", "frac", *[a for kv in TINY for a in ("--set", kv)],
              "--set", f"tracking.reports_dir={tmp_path}/reports"]
    full = ["sweep", "--grid", "users.malicious_fraction=0.2,0.4", *common]
    assert main([*full, "--report-only"]) == 2  # nothing recorded: refused, nothing run
    assert "--report-only: no cell of this config is recorded" in capsys.readouterr().err
    assert main(["sweep", "--grid", "users.malicious_fraction=0.2", *common]) == 0
    import pipeline.experiment.queue as queue
    monkeypatch.setattr(queue, "run_cells", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    assert main([*full, "--report-only"]) == 0
    report = json.loads((tmp_path / "reports" / "frac.json").read_text())
    assert set(report["results"]["label_flip"]["attack"]) == {"users.malicious_fraction=0.2"}
    assert [m["arm"] for m in report["missing"]] == ["attack"]  # the 0.4 setting's attack cell (benign is shared)
    assert "Not recorded yet (1 cell" in (tmp_path / "reports" / "frac.md").read_text()


# `auror sweep`, but the process SIGKILLs itself when local training starts for the n-th time: a worker
# that dies in the middle of a cell, after that cell's checkpoint of the previous round
KILLED_WORKER = """
import os, signal, sys
import pipeline.core.loop
from pipeline.experiment.cli import main

train, calls = pipeline.core.loop.train_users, []

def train_then_die(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return train(*args, **kwargs)

pipeline.core.loop.train_users = train_then_die
sys.exit(main(["sweep", *sys.argv[2:]]))
"""


def tracked_sweep_args(tmp_path) -> list[str]:
    return ["--grid", "users.malicious_fraction=0.4", "--arms", "attack", "--sweep-name", "killed",
            "--storage", f"sqlite:///{tmp_path}/s.db", *[a for kv in TINY for a in ("--set", kv)],
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
            "--set", f"tracking.artifact_dir={tmp_path}/mlruns/artifacts",
            "--set", f"tracking.reports_dir={tmp_path}/reports"]


def cell_runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["auror"], output_format="list")


@pytest.mark.slow
@pytest.mark.parametrize("same_machine", [True, False], ids=["checkpoint-reachable", "checkpoint-elsewhere"])
def test_a_killed_cell_ends_with_one_finished_run_and_no_running_one(tmp_path, monkeypatch, same_machine):
    """A SIGKILLed worker's cell is taken over: from its checkpoint and in its own MLflow run where the
    folder is reachable, else from scratch with the killed attempt's run ended KILLED."""
    import subprocess
    import sys

    args = tracked_sweep_args(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_WORKER, "3", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (attempt,) = cell_runs(tmp_path)
    assert attempt.info.status == "RUNNING"
    folders = list((tmp_path / "mlruns" / "checkpoints").glob("cell-*"))
    assert len(folders) == 1 and (folders[0] / "seed0-attack.pt").is_file()
    if not same_machine:
        import shutil

        shutil.rmtree(folders[0])

    monkeypatch.setattr(storage, "GRACE_PERIOD_S", 1.0)
    time.sleep(1.5)  # the killed worker's heartbeat is stale now
    assert main(["sweep", *args]) == 0
    runs = cell_runs(tmp_path)
    assert sorted(r.info.status for r in runs) == (["FINISHED"] if same_machine else ["FINISHED", "KILLED"])
    assert not list((tmp_path / "mlruns" / "checkpoints").glob("cell-*"))  # no orphaned checkpoint folder
    finished = next(r for r in runs if r.info.status == "FINISHED")
    assert (finished.info.run_id == attempt.info.run_id) == same_machine

    # the same cell run whole, untracked, gives the same metrics
    reference = json.loads((tmp_path / "reports" / "killed.json").read_text())["results"]["label_flip"]["attack"]
    assert main(["sweep", *args, "--no-track", "--sweep-name", "whole", "--storage", f"sqlite:///{tmp_path}/w.db"]) == 0
    whole = json.loads((tmp_path / "reports" / "whole.json").read_text())["results"]["label_flip"]["attack"]
    assert whole == reference


@pytest.mark.slow
def test_a_cell_whose_result_the_storage_lost_is_not_run_twice(tmp_path, monkeypatch):
    """The storage fails as the finished cell's result is written: the rerun takes the result from the
    cell's own folder instead of running (and tracking) the cell a second time."""
    from pipeline.experiment import queue

    args = tracked_sweep_args(tmp_path)
    real = queue.Sweep.finish

    def outage(self, key, worker, metrics):
        raise RuntimeError("the storage is gone")

    monkeypatch.setattr(queue.Sweep, "finish", outage)
    with pytest.raises(RuntimeError, match="the storage is gone"):
        main(["sweep", *args])
    monkeypatch.setattr(queue.Sweep, "finish", real)
    monkeypatch.setattr(storage, "GRACE_PERIOD_S", 1.0)
    time.sleep(1.5)
    import pipeline.core.loop

    trained, train = [], pipeline.core.loop.train_users
    monkeypatch.setattr(pipeline.core.loop, "train_users", lambda *a, **kw: trained.append(1) or train(*a, **kw))
    assert main(["sweep", *args]) == 0
    assert trained == [] and [r.info.status for r in cell_runs(tmp_path)] == ["FINISHED"]
    assert not list((tmp_path / "mlruns" / "checkpoints").glob("cell-*"))


def test_a_table_created_by_another_worker_at_the_same_moment_is_not_an_error():
    """PostgreSQL reports a concurrent CREATE as a unique violation or as "already exists" (seen in CI:
    two workers opening one new Optuna storage); any other failure stays an error."""
    import sqlalchemy as sa

    from pipeline.experiment.storage import created_meanwhile

    duplicate = sa.exc.ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists'))
    assert created_meanwhile(duplicate)
    assert created_meanwhile(sa.exc.IntegrityError("CREATE TYPE", {}, Exception("duplicate key value")))
    assert not created_meanwhile(sa.exc.ProgrammingError("SELECT", {}, Exception('relation "x" does not exist')))
    assert not created_meanwhile(sa.exc.OperationalError("connect", {}, Exception("connection refused")))


def test_a_sweep_over_attacks_reports_each_attack_in_its_own_section(tmp_path):
    """A grid with an attack.name axis: a section per attack, headed by its kind, with its settings' columns only
    (the benign cell shared across them); the cells are still found where a sweep records them."""
    from pipeline.experiment.compare import sweep_grid

    base = load_config(None, [*TINY, f"tracking.reports_dir={tmp_path}"])
    grid = sweep_grid(base, ["attack.name=label_flip,ipm", "users.malicious_fraction=0.2,0.4"], [0],
                      ["benign", "attack"], "mixed")
    (group, cells), = grid.cells.items()
    metrics = {c.key: {"accuracy": 0.5 if c.arm == "attack" else 0.9, "attack_success_rate": 0.7,
                       "detection_rate": None, "false_positive_rate": None} for c in cells}
    grid.store.record(group, cells, metrics)
    md = grid.write_report("auror sweep ...")
    results = json.loads(md.with_suffix(".json").read_text())["results"]
    assert list(results) == ["label_flip", "ipm"]
    assert list(results["ipm"]["attack"]) == ["attack.name=ipm, users.malicious_fraction=0.2",
                                              "attack.name=ipm, users.malicious_fraction=0.4"]
    assert results["ipm"]["attack"]["attack.name=ipm, users.malicious_fraction=0.2"]["accuracy_drop"] == \
        pytest.approx(0.4)
    text = md.read_text()
    assert "## label_flip (targeted, 1 -> 7)" in text and "## ipm (untargeted: success is AD)" in text
    assert text.count("| benign (no attack) |") == 2
