"""Sweeps: cells claimed from a shared table (SQLite here; tests/test_scale_out.py runs PostgreSQL)."""

import json
import multiprocessing
import time

import pytest

from pipeline.experiment import sweep as sweep_module
from pipeline.experiment.cli import main
from pipeline.experiment.compare import grid_settings, plan_cells
from pipeline.experiment.config import ConfigError
from pipeline.experiment.storage import database_url
from pipeline.experiment.sweep import Cell, Sweep, work
from tests.conftest import TINY


def cells(n: int, config: str = "h") -> list[Cell]:
    return [Cell("attack", f"setting {i}", 0, (f"users.malicious_fraction=0.{i}",), f"{config}{i}") for i in range(n)]


def slow_cell(cell: Cell) -> dict:
    time.sleep(0.2)
    return {"accuracy": float(cell.config_hash[-1])}


def worker(url: str, n: int) -> None:
    work(Sweep(url, "s"), cells(n), slow_cell)


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
    assert {r["key"]: r["result"]["accuracy"] for r in rows} == {c.key: float(c.config_hash[-1]) for c in cells(8)}


def test_a_finished_cell_is_never_rerun_and_a_new_config_is_a_new_cell(tmp_path):
    s = Sweep(f"sqlite:///{tmp_path}/sweeps.db", "s")
    ran = []
    assert work(s, cells(3), lambda c: ran.append(c.key) or {}) == 3
    assert work(s, cells(3), lambda c: ran.append(c.key) or {}) == 0
    assert work(s, cells(3, config="other"), lambda c: ran.append(c.key) or {}) == 3
    assert len(ran) == len(set(ran)) == 6


def test_the_cell_of_a_dead_worker_is_taken_over_once_its_heartbeat_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "GRACE_PERIOD_S", 1.0)
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
    settings = grid_settings(["users.malicious_fraction=0.1,0.3", "training.hidden_sizes=[16],[8,8]"])
    assert [s.label for s in settings] == [
        "users.malicious_fraction=0.1, training.hidden_sizes=[16]",
        "users.malicious_fraction=0.1, training.hidden_sizes=[8,8]",
        "users.malicious_fraction=0.3, training.hidden_sizes=[16]",
        "users.malicious_fraction=0.3, training.hidden_sizes=[8,8]",
    ]
    with pytest.raises(ConfigError, match="--grid: expected KEY=V1,V2"):
        grid_settings(["users.malicious_fraction"])


def test_the_benign_arm_is_one_cell_for_settings_that_differ_in_who_attacks():
    planned = plan_cells(None, TINY, grid_settings(["users.malicious_fraction=0.2,0.4"]), [0, 1], ["benign", "attack"])
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


def test_auror_sweep_runs_a_grid_and_reports_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--grid", "users.malicious_fraction=0.2,0.4", "--arms", "benign", "attack", "median",
            "--seeds", "0", "--no-track", "--storage", f"sqlite:///{tmp_path}/s.db", "--sweep-name", "frac",
            *[a for kv in TINY for a in ("--set", kv)], "--set", f"tracking.reports_dir={tmp_path}/reports"]
    assert main(args) == 0
    table = json.loads((tmp_path / "reports" / "frac.json").read_text())["label_flip"]  # {attack: {arm: ...}}
    assert set(table) == {"benign", "attack", "median"}
    assert set(table["attack"]) == {"users.malicious_fraction=0.2", "users.malicious_fraction=0.4"}
    assert table["benign"]["users.malicious_fraction=0.2"] == table["benign"]["users.malicious_fraction=0.4"]
    assert (tmp_path / "reports" / "frac.png").stat().st_size > 0
    assert "| median |" in capsys.readouterr().out
    rows = Sweep(f"sqlite:///{tmp_path}/s.db", "frac").rows()
    assert len(rows) == 5 and {r["state"] for r in rows} == {"done"}  # benign shared: 1 + 2 + 2
    assert main(args) == 0  # everything finished: nothing runs again
    assert all(r["attempts"] == 1 for r in Sweep(f"sqlite:///{tmp_path}/s.db", "frac").rows())
