"""The results store: every finished cell's metrics by its key (:func:`pipeline.experiment.grid.cell_key`).

One JSON file per (group, arm), ``<root>/<group>/<arm>.json`` (a comparison's group is the attack: the
files DVC's per-(attack, arm) stages output), ``{key: {"label", "seed", "metrics"}}``, rewritten
atomically. A result is found by its key alone, so a changed config never finds the old config's
numbers; label and seed are there for people reading the file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from pipeline.core.checkpoint import write_atomic
from pipeline.core.errors import ConfigError
from pipeline.experiment.config import Config, config_hash, first_difference, without_unkeyed

if TYPE_CHECKING:
    from pipeline.experiment.grid import Cell


class ResultsStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, group: str, arm: str) -> Path:
        return self.root / group / f"{arm}.json"

    def load(self, group: str, arm: str) -> dict[str, dict]:
        """The records of ``<group>/<arm>.json``; a damaged file (a merge conflict, an edit) is refused in one
        line before any cell runs."""
        path = self.path(group, arm)
        if not path.is_file():
            return {}
        try:
            records = json.loads(path.read_text())
            damage = None if isinstance(records, dict) and all(isinstance(r, dict) and "metrics" in r
                                                                for r in records.values()) else "not a map of cells"
        except ValueError as err:  # (a UnicodeDecodeError too)
            damage = str(err)
        if damage is not None:
            raise ConfigError(f"{path}: not a results file ({damage}); restore it (git checkout -- <file>) or delete "
                              "it to run its cells again")
        return records

    def results(self, group: str, cells: list[Cell]) -> dict[str, dict]:
        """``{key: metrics}`` of the ``cells`` recorded under ``group``."""
        found: dict[str, dict] = {}
        for arm in dict.fromkeys(c.arm for c in cells):
            records = self.load(group, arm)
            found.update({c.key: records[c.key]["metrics"] for c in cells if c.arm == arm and c.key in records})
        return found

    def record(self, group: str, cells: list[Cell], results: dict[str, dict]) -> None:
        """Add the ``cells`` whose metrics ``results`` holds (by key) to their arms' files."""
        for arm in dict.fromkeys(c.arm for c in cells if c.key in results):
            records = self.load(group, arm)
            records.update({c.key: {"label": c.label, "seed": c.seed, "metrics": results[c.key]}
                            for c in cells if c.arm == arm and c.key in results})
            text = (json.dumps(records, indent=1, sort_keys=True) + "\n").encode()
            write_atomic(self.path(group, arm), lambda f: f.write(text))


def write_report_file(path: Path, content: str | Callable[[BinaryIO], Any]) -> Path:
    """A report's file (text, or what ``content`` writes, a figure) written whole through a temporary file:
    the workers of one sweep or search rewrite the same report, and a reader never sees half of one."""
    write_atomic(path, (lambda f: f.write(content.encode())) if isinstance(content, str) else content)
    return path


def write_csv(rows: list[dict], path: Path, fieldnames: list[str] | None = None) -> Path:
    """Rows as a CSV file with a header (``fieldnames``, default the first row's keys), written whole."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fieldnames or (list(rows[0]) if rows else []))
    writer.writeheader()
    writer.writerows(rows)
    return write_report_file(path, text.getvalue())


def report_config(cfg: Config) -> dict:
    """The config a report shows, named in its JSON (``config``): everything but where it writes and the device."""
    shown = without_unkeyed({k: v for k, v in cfg.flat().items()
                             if not k.startswith(("tracking.", "report.")) and k != "training.device"}, cfg)
    return {"hash": config_hash(shown), "values": shown}


def check_report(json_path: Path, config: dict, elsewhere: str) -> None:
    """Refuse (before any work) to write a report over one of another config: the new one goes
    ``elsewhere`` (the option that names it) or the old one is deleted first. A report that names
    no config (written before reports named theirs) is replaced. Keys the old report's config did not
    have (a defense or attack registered since) do not make it another config while they hold their
    built-in defaults."""
    if not json_path.is_file():
        return
    try:
        old = json.loads(json_path.read_text()).get("config")
    except (ValueError, AttributeError):
        old = None
    if isinstance(old, dict) and old.get("hash") != config["hash"]:
        before, defaults = old.get("values", {}), Config().flat()
        now = {k: v for k, v in config["values"].items() if k in before or k not in defaults or defaults[k] != v}
        difference = first_difference(before, now)
        if difference:
            raise ConfigError(f"{json_path}: holds a report of another config ({difference}); {elsewhere}, "
                              "or delete it first")
