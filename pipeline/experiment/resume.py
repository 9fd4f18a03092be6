"""Continuing an interrupted ``auror run`` (``auror run --resume ID``).

Every ``auror run`` (all its seeds and arms: one *invocation*) gets a folder
``<checkpoints>/<id>/``, ``<checkpoints>`` being ``checkpoints/`` beside
``tracking.artifact_dir`` (by default ``mlruns/checkpoints``, ignored by git):

- ``params.yaml``: the config it runs; a resume runs exactly this one;
- ``invocation.json``: its seeds and arms, the MLflow run id of every arm
  started, and the final metrics, per-round history and detection report of
  every finished arm (a resume reads them back instead of re-running);
- ``seed<S>-<arm>.pt``: the :class:`~pipeline.core.checkpoint.Checkpoint` of the arm
  in progress, rewritten after every round, deleted when the arm finishes.

A resume reopens the interrupted arm's MLflow run (same run id, status back to
RUNNING), continues the loop after the checkpoint's round, runs the arms not
started yet, and ends with exactly the metrics of an uninterrupted run: every
random stream derives from (seed, round, user).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
import yaml

from pipeline.core.checkpoint import Checkpoint, write_atomic
from pipeline.experiment.config import Config, ConfigError, load_config
from pipeline.experiment.grid import cell_key
from pipeline.experiment.tracking import absolute_uri, run_name, run_tags

VERSION = 1
RECORD = "invocation.json"
RESUME_TAG = "resume_id"  # on every arm's MLflow run: `auror run --resume RUN_ID` finds the invocation by it
CELL_TAG = "cell"  # on a grid cell's MLflow run: its key (a takeover ends the killed attempt's run by it)


def checkpoints_root(cfg: Config) -> Path:
    """``checkpoints/`` beside ``tracking.artifact_dir`` (default ``mlruns/checkpoints``)."""
    return Path(cfg.tracking.artifact_dir).parent / "checkpoints"


def cell_folder(cfg: Config, cell: str) -> Path:
    """The one checkpoint folder of the grid cell keyed ``cell`` (removed once the queue has its result)."""
    return checkpoints_root(cfg) / ("cell-" + hashlib.sha256(cell.encode()).hexdigest()[:16])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during an invocation that can be resumed; ``resume_id`` says which."""

    def __init__(self, resume_id: str) -> None:
        super().__init__(resume_id)
        self.resume_id = resume_id


@dataclass
class Invocation:
    """One ``auror run``'s resume folder; see the module docstring."""

    folder: Path
    record: dict[str, Any]
    cfg: Config

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def seeds(self) -> list[int]:
        return self.record["seeds"]

    @property
    def arms(self) -> list[str]:
        return self.record["arms"]

    @property
    def cell(self) -> str | None:
        """The key of the grid cell this invocation runs (``None`` for an ``auror run``)."""
        return self.record.get("cell")

    @classmethod
    def create(cls, cfg: Config, seeds: list[int], arms: list[str], cell: str | None = None) -> "Invocation":
        """A new folder: a fresh id for an ``auror run``; for a grid cell, the one folder of its key, so that
        the cell's next attempt (a rerun, or a takeover of a killed worker's cell) finds it."""
        if cell is None:
            folder = checkpoints_root(cfg) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        else:
            folder = cell_folder(cfg, cell)
            if (folder / RECORD).is_file():
                return cls.read(folder, cfg)
        folder.mkdir(parents=True, exist_ok=cell is not None)
        resume_id = folder.name
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
        write_atomic(folder / "params.yaml", lambda f: f.write(text))
        record = {"version": VERSION, "id": resume_id, "cwd": str(Path.cwd()), "seeds": list(seeds),
                  "arms": list(arms), "runs": {}, "finished": {}, **({"cell": cell} if cell else {})}
        invocation = cls(folder, record, cfg)
        invocation._write()
        return invocation

    @classmethod
    def read(cls, folder: Path, cfg: Config) -> "Invocation":
        """The invocation recorded in ``folder``, run under ``cfg``; :class:`ConfigError` when unreadable."""
        try:
            return cls(folder, _load_record(folder), cfg)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{folder / RECORD} is unreadable ({err}); delete {folder} to start it again") from None
    def _write(self) -> None:
        write_atomic(self.folder / RECORD, lambda f: f.write((json.dumps(self.record, indent=1) + "\n").encode()))

    def run_id(self, seed: int, arm: str) -> str | None:
        return self.record["runs"].get(f"{seed}/{arm}")

    def set_run_id(self, seed: int, arm: str, run_id: str) -> None:
        self.record["runs"][f"{seed}/{arm}"] = run_id
        self._write()

    def checkpoint(self, seed: int, arm: str) -> Checkpoint:
        """The arm's checkpoint, bound to the key of its resolved config (another config's is refused)."""
        return Checkpoint(self.folder / f"seed{seed}-{arm}.pt", cell_key(dataclasses.replace(self.cfg, seed=seed), arm))

    def finished(self, seed: int, arm: str) -> dict[str, Any] | None:
        """``{"metrics", "history", "detection"}`` of a finished arm, else ``None``."""
        return self.record["finished"].get(f"{seed}/{arm}")

    def finish_arm(self, seed: int, arm: str, metrics: dict, history: list[dict], detection: dict) -> None:
        self.record["finished"][f"{seed}/{arm}"] = {"metrics": metrics, "history": history, "detection": detection}
        self._write()
        self.checkpoint(seed, arm).delete()


def open_invocation(ref: str, cfg: Config) -> Invocation:
    """The invocation ``ref`` names: its folder, its id (a folder under the
    checkpoints of ``cfg``), or the MLflow run id of one of its arms (looked up
    in ``cfg``'s tracking store). Raises :class:`ConfigError` (one line) when
    there is none, or when it cannot be resumed from here."""
    folder = _find(ref, cfg)
    try:
        record = _load_record(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume {ref}: {folder / RECORD} is unreadable ({err})") from None
    if record.get("version") != VERSION:
        raise ConfigError(f"--resume {ref}: written by another version of auror (format {record.get('version')}, "
                          f"this one reads {VERSION}); start a new run")
    resumed = load_config(folder / "params.yaml")
    tr = resumed.tracking
    relative_uri = tr.tracking_uri.startswith("sqlite:///") and not tr.tracking_uri.startswith("sqlite:////")
    relative = relative_uri or not Path(tr.artifact_dir).is_absolute() or not Path(tr.reports_dir).is_absolute()
    if relative and Path(record["cwd"]).resolve() != Path.cwd().resolve():
        raise ConfigError(f"--resume {ref}: run it from {record['cwd']}, where the interrupted run started "
                          "(its tracking and report paths are relative to that folder)")
    invocation = Invocation(folder, record, resumed)
    for seed in record["seeds"]:  # a checkpoint that does not prove itself fails here, before any run is reopened
        for arm in record["arms"]:
            if invocation.finished(seed, arm) is None:
                invocation.checkpoint(seed, arm).load()
    return invocation


def _load_record(folder: Path) -> dict:
    record = json.loads((folder / RECORD).read_text())
    if not isinstance(record, dict) or {"id", "seeds", "arms", "runs", "finished"} - record.keys():
        raise ValueError("missing fields")
    return record


def _find(ref: str, cfg: Config) -> Path:
    root = checkpoints_root(cfg)
    for folder in (Path(ref), root / ref):
        if ref and (folder / RECORD).is_file():
            return folder
    uri = cfg.tracking.tracking_uri
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        resume_id = _resume_id_of_run(ref, uri)
        if resume_id is not None:
            if (root / resume_id / RECORD).is_file():
                return root / resume_id
            raise ConfigError(f"--resume {ref}: MLflow run {ref} belongs to auror run {resume_id}, whose folder "
                              f"{root / resume_id} is gone")
    raise ConfigError(f"--resume {ref}: no interrupted auror run with this id or folder (looked in {root} "
                      f"and for an MLflow run in {uri})")


def _resume_id_of_run(run_id: str, uri: str) -> str | None:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # no store: do not create one just to look
    try:
        run = mlflow.MlflowClient(tracking_uri=absolute_uri(uri)).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    if RESUME_TAG not in run.data.tags:
        raise ConfigError(f"--resume {run_id}: MLflow run {run_id} was not started by auror run (no "
                          f"{RESUME_TAG} tag); nothing to resume")
    return run.data.tags[RESUME_TAG]


@contextlib.contextmanager
def arm_run(experiment_id: str, cfg: Config, arm: str, invocation: Invocation | None) -> Iterator[Any]:
    """The arm's MLflow run: reopened when the invocation started it before,
    else new. Ends FINISHED when the block completes, KILLED on Ctrl-C, FAILED
    on any other error: no run is left RUNNING by a live process."""
    run_id = invocation.run_id(cfg.seed, arm) if invocation is not None else None
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id)
    else:
        if invocation is not None and invocation.cell is not None:
            end_abandoned_runs(experiment_id, invocation.cell)
        tags = {**run_tags(cfg, arm), **({RESUME_TAG: invocation.id} if invocation is not None else {}),
                **({CELL_TAG: invocation.cell} if invocation is not None and invocation.cell else {})}
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name(cfg, arm), tags=tags)
        if invocation is not None:
            invocation.set_run_id(cfg.seed, arm, run.info.run_id)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def end_abandoned_runs(experiment_id: str, cell: str) -> None:
    """End as KILLED the runs a killed attempt at ``cell`` left RUNNING (its worker is gone: the queue
    gave the cell to this one), so that a cell never has a run left RUNNING beside its finished one."""
    client = mlflow.MlflowClient()
    escaped = cell.replace("'", "\\'")
    for run in client.search_runs([experiment_id], f"tags.{CELL_TAG} = '{escaped}' and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, "KILLED")
