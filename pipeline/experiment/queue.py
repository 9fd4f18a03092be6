"""The queue: cells of a grid (:mod:`pipeline.experiment.grid`) claimed from a shared table, so that many
workers split one sweep, and the one runner of a cell.

A sweep's cells are rows of the table ``auror_cells`` in a database (``sqlite:///`` on one
machine, ``postgresql://`` across machines). Every worker pointed at the same
database and sweep name adds the cells it was asked for (a cell already there
is kept), then claims them one at a time:

- a claim is an ``UPDATE ... WHERE state = 'todo'`` that only one worker can
  win, so no cell runs twice at once;
- a running cell's worker refreshes its heartbeat every :data:`HEARTBEAT_S`
  seconds; a cell whose heartbeat is older than ``GRACE_PERIOD_S`` belongs
  to a worker that died (SIGKILL, power loss) and is claimed again;
- a finished cell (``done``, its metrics stored in the row) is never rerun;
  a cell whose run raised is ``failed`` with the error and is tried again by
  the next command that names it;
- a worker with nothing left to claim waits while other workers' cells run
  (to take one over if its worker dies) and stops when the sweep is finished.

A cell's key is the hash of its resolved config (:func:`pipeline.experiment.grid.cell_key`), so
changing the config gives new cells instead of reusing results of the old one. A cell that a
killed worker left is resumed from its checkpoint where that worker's folder is reachable, and
its MLflow run is reopened, or ended KILLED where it is not: a cell ends with one FINISHED run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy as sa

from pipeline.core.errors import CellsFailed
from pipeline.experiment import storage
from pipeline.experiment.grid import Cell
from pipeline.experiment.resume import Invocation, cell_folder
from pipeline.experiment.run import run_experiment
from pipeline.experiment.storage import HEARTBEAT_S, open_engine, store_lock

log = logging.getLogger("auror")

METADATA = sa.MetaData()
CELLS = sa.Table(
    "auror_cells", METADATA,
    sa.Column("sweep", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(400), primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON: what to run (arm, label, seed, overrides)
    sa.Column("state", sa.String(10), nullable=False),  # todo | running | done | failed
    sa.Column("worker", sa.String(200)),
    sa.Column("heartbeat", sa.Float),  # the worker's clock (time.time()); workers' clocks agree (NTP)
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("result", sa.Text),  # JSON metrics when done, the error when failed
)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Sweep:
    """One sweep's cells in one database."""

    def __init__(self, url: str, name: str, option: str = "--storage") -> None:
        self.name = name
        self.engine = open_engine(url, option)
        try:
            with store_lock(url), self.engine.begin() as conn:
                METADATA.create_all(conn, checkfirst=True)
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError) as err:
            if not storage.created_meanwhile(err):  # else another worker created it just now: it exists
                raise

    def _where(self, *clauses):
        return sa.and_(CELLS.c.sweep == self.name, *clauses)

    def add(self, cells: list[Cell]) -> None:
        """Add the cells not in the table yet; put failed ones back to do."""
        rows = [{"sweep": self.name, "key": c.key, "spec": c.spec(), "state": "todo", "attempts": 0} for c in cells]
        insert = (sa.dialects.postgresql.insert if self.engine.dialect.name == "postgresql"
                  else sa.dialects.sqlite.insert)
        with self.engine.begin() as conn:
            for start in range(0, len(rows), 500):
                conn.execute(insert(CELLS).on_conflict_do_nothing(), rows[start:start + 500])
            conn.execute(CELLS.update().where(self._where(CELLS.c.state == "failed",
                                                          CELLS.c.key.in_([c.key for c in cells])))
                         .values(state="todo", result=None))

    def claim(self, worker: str, keys: list[str]) -> str | None:
        """The key of one of ``keys`` that this worker now runs (to do, or of a dead worker), or None."""
        while True:
            stale = time.time() - storage.GRACE_PERIOD_S
            claimable = sa.and_(CELLS.c.key.in_(keys), sa.or_(
                CELLS.c.state == "todo", sa.and_(CELLS.c.state == "running", CELLS.c.heartbeat < stale)))
            with self.engine.begin() as conn:
                key = conn.execute(sa.select(CELLS.c.key).where(self._where(claimable))
                                   .order_by(CELLS.c.key).limit(1)).scalar()
                if key is None:
                    return None
                won = conn.execute(CELLS.update().where(self._where(CELLS.c.key == key, claimable))
                                   .values(state="running", worker=worker, heartbeat=time.time(),
                                           attempts=CELLS.c.attempts + 1)).rowcount
            if won:
                return key
            # another worker claimed it between the two statements: look again

    def release_dead_local(self, keys: list[str]) -> None:
        """Give back, to do, the running cells of ``keys`` whose worker ran on this machine and is gone (killed,
        or stopped by an outage of this storage): a rerun takes them at once, not after the grace period."""
        host = socket.gethostname()
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(CELLS.c.key, CELLS.c.worker).where(self._where(
                CELLS.c.state == "running", CELLS.c.key.in_(keys), CELLS.c.worker.like(f"{host}:%")))).all()
            dead = [key for key, worker in rows if not _alive(int(worker.rsplit(":", 1)[1]))]
            if dead:
                conn.execute(CELLS.update().where(self._where(CELLS.c.state == "running", CELLS.c.key.in_(dead)))
                             .values(state="todo"))

    def beat(self, key: str, worker: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(CELLS.update().where(self._where(CELLS.c.key == key, CELLS.c.state == "running",
                                                         CELLS.c.worker == worker)).values(heartbeat=time.time()))

    def finish(self, key: str, worker: str, metrics: dict) -> None:
        """Store the metrics; a cell another worker finished first keeps its result (counted once)."""
        with self.engine.begin() as conn:
            conn.execute(CELLS.update().where(self._where(CELLS.c.key == key, CELLS.c.state != "done"))
                         .values(state="done", worker=worker, result=json.dumps(metrics)))

    def release(self, key: str, worker: str, error: str | None) -> None:
        """Give a cell back: ``failed`` with the error, or to do again (interrupted)."""
        with self.engine.begin() as conn:
            conn.execute(CELLS.update().where(self._where(CELLS.c.key == key, CELLS.c.state == "running",
                                                         CELLS.c.worker == worker))
                         .values(state="failed" if error else "todo", result=error))

    def counts(self, keys: list[str] | None = None) -> dict[str, int]:
        """Cells by state (of ``keys`` only, when given)."""
        query = sa.select(CELLS.c.state, sa.func.count()).where(self._where()).group_by(CELLS.c.state)
        if keys is not None:
            query = query.where(CELLS.c.key.in_(keys))
        with self.engine.connect() as conn:
            return dict(conn.execute(query).all())

    def rows(self, keys: list[str] | None = None) -> list[dict]:
        """Every cell (of ``keys``, when given): key, spec, state, worker, attempts, result (decoded)."""
        query = sa.select(CELLS).where(self._where()).order_by(CELLS.c.key)
        if keys is not None:
            query = query.where(CELLS.c.key.in_(keys))
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for row in rows:
            row["spec"] = json.loads(row["spec"])
            if row["state"] == "done":
                row["result"] = json.loads(row["result"])
        return rows

    def results(self, keys: list[str] | None = None) -> dict[str, dict]:
        """``{key: metrics}`` of the finished cells."""
        return {r["key"]: r["result"] for r in self.rows(keys) if r["state"] == "done"}


@contextlib.contextmanager
def heartbeat(sweep: Sweep, key: str, worker: str) -> Iterator[None]:
    """Refresh the cell's heartbeat from a thread while the cell runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(sa.exc.SQLAlchemyError):  # a missed beat is retried at the next one
                sweep.beat(key, worker)

    thread = threading.Thread(target=loop, name=f"heartbeat {key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def work(sweep: Sweep, cells: list[Cell], run_cell: Callable[[Cell], dict],
         on_done: Callable[[Cell, dict], None] = lambda cell, metrics: None, poll_s: float = HEARTBEAT_S) -> int:
    """Add ``cells`` to the sweep and run them with the other workers until every one is finished or failed.

    ``run_cell`` returns a cell's metrics; ``on_done`` is called after each cell
    this worker finished. Returns the number of cells this worker ran.
    """
    worker = worker_name()
    by_key = {c.key: c for c in cells}
    sweep.add(cells)
    keys = list(by_key)
    sweep.release_dead_local(keys)
    ran = 0
    waiting_shown = False
    while True:
        key = sweep.claim(worker, keys)
        if key is None:
            running = sweep.counts(keys).get("running", 0)
            if not running:
                return ran
            if not waiting_shown:
                log.info("sweep %s: nothing left to claim; waiting for %d cell(s) running elsewhere "
                         "(one whose worker dies is taken over)", sweep.name, running)
                waiting_shown = True
            time.sleep(poll_s)
            continue
        waiting_shown = False
        cell = by_key[key]
        counts = sweep.counts(keys)
        log.info("== cell %s: %s, %s, seed %d (%d done, %d running, %d to do)", sweep.name, cell.arm, cell.label,
                 cell.seed, counts.get("done", 0), counts.get("running", 0), counts.get("todo", 0))
        try:
            with heartbeat(sweep, key, worker):
                metrics = run_cell(cell)
        except KeyboardInterrupt:
            sweep.release(key, worker, None)
            raise
        except Exception as err:  # noqa: BLE001 - recorded in the table and reported at the end
            log.error("cell %s failed: %s: %s", key, type(err).__name__, err)
            sweep.release(key, worker, f"{type(err).__name__}: {err}")
            continue
        sweep.finish(key, worker, metrics)
        ran += 1
        on_done(cell, metrics)


def run_cells(cells: list[Cell], sweep: Sweep, track: bool,
              on_done: Callable[[Cell, dict], None] = lambda cell, metrics: None) -> None:
    """Run ``cells`` with every other worker of ``sweep``, each through :func:`run_experiment` with its
    own run outputs, checkpoints and MLflow run; raise :class:`CellsFailed` if any failed."""
    def own(cell: Cell):
        out = Path(cell.cfg.tracking.reports_dir) / "cell-runs" / cell.key.replace("|", "-").replace(" ", "")
        return dataclasses.replace(cell.cfg, tracking=dataclasses.replace(cell.cfg.tracking, reports_dir=str(out)))

    def run_cell(cell: Cell) -> dict:
        cfg = own(cell)
        invocation = Invocation.create(cfg, [cell.seed], [cell.arm], cell=cell.key) if track else None
        return run_experiment(cfg, [cell.seed], track=track, arms=[cell.arm], resume=invocation)[cell.arm]

    def done(cell: Cell, metrics: dict) -> None:
        if track:  # the queue holds the result now: the cell's checkpoint folder is not needed again
            shutil.rmtree(cell_folder(own(cell), cell.key), ignore_errors=True)
        on_done(cell, metrics)

    work(sweep, cells, run_cell, done)
    failed = [r for r in sweep.rows([c.key for c in cells]) if r["state"] == "failed"]
    if failed:
        raise CellsFailed(f"{len(failed)} cell(s) of sweep {sweep.name} failed, e.g. {failed[0]['key']}: "
                          f"{failed[0]['result']}; run the same command again to retry them")
