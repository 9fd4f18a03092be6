"""The model of the work every command shares: a *grid* of settings (named overrides of config
keys) times seeds times arms expands to *cells*; a cell is one arm under one fully resolved
config, and its key is the hash of what its metrics depend on. Two cells with one key are one
run: the benign arm of settings that differ only in who attacks, a defense's arm across values of
another defense's knob. A recorded result is found by its key, never by a label.

Presets (the comparison's settings, the paper's tables) are data: lists of :class:`Setting`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import ConfigError
from pipeline.experiment.arms import arm_defense, arm_params, check_arms, make_attack
from pipeline.experiment.config import Config, config_hash, first_repeat, with_overrides, without_unkeyed


@dataclass(frozen=True)
class Setting:
    """One column of a grid: ``overrides`` (``key=value``) applied to the base config, shown as ``label``."""

    label: str
    overrides: tuple[str, ...] = ()


# The comparison (`auror compare`): label flipping, the paper's attack, on four settings; every other
# attack on IID and Dirichlet(0.5) at 30% malicious users.
IID = {f: Setting(f"IID {f:.0%}", ("users.partition=iid", f"users.malicious_fraction={f}")) for f in (0.1, 0.2, 0.3)}
DIRICHLET = Setting("Dirichlet(0.5) 30%", ("users.partition=dirichlet", "users.dirichlet_alpha=0.5",
                                           "users.malicious_fraction=0.3"))
COMPARE_SETTINGS = (IID[0.1], IID[0.2], IID[0.3], DIRICHLET)
MATRIX_SETTINGS = (IID[0.3], DIRICHLET)


def attack_settings(attack: str) -> list[Setting]:
    """The comparison's settings of ``attack``, each with ``attack.name`` set."""
    return [Setting(s.label, (f"attack.name={attack}", *s.overrides))
            for s in (COMPARE_SETTINGS if attack == "label_flip" else MATRIX_SETTINGS)]


def parse_grid(items: Sequence[str]) -> list[Setting]:
    """``["key=v1,v2", ...]`` (commas inside [...] kept) as one setting per combination of values.
    Refused in one line: an item without values, a key or a value given twice, and ``seed`` (the
    seeds are ``--seeds``: every cell runs each of them and the report averages them)."""
    axes: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in re.split(r",(?![^\[]*\])", values)]
        if not sep or not key or not all(parts):
            raise ConfigError(f"--grid: expected KEY=V1,V2,... (e.g. users.malicious_fraction=0.1,0.3), got {item!r}")
        if key == "seed":
            raise ConfigError("--grid: seed is not a grid axis; give the seeds with --seeds 0 1 ... (every cell "
                              "runs each seed and the report averages them)")
        if key in axes:
            raise ConfigError(f"--grid: {key} is given twice; list all its values once, {key}=V1,V2,...")
        repeated = first_repeat(parts)
        if repeated is not None:
            raise ConfigError(f"--grid: {key}={repeated} is given twice")
        axes[key] = parts
    return [Setting(", ".join(f"{k}={v}" for k, v in combo), tuple(f"{k}={v}" for k, v in combo))
            for combo in itertools.product(*([(k, v) for v in vs] for k, vs in axes.items()))]


def cell_config(cfg: Config, arm: str) -> dict:
    """What a cell's metrics depend on: the config less where it writes, the device (a sweep may
    span machines) and the other defenses' and attacks' sections; for the benign arm, less the attack
    and who attacks too, but with how the attack's success is measured (nobody attacks)."""
    knobs = {k: v for k, v in arm_params(cfg, arm).items()
             if not k.startswith(("tracking.", "report.")) and k != "training.device"}
    knobs = without_unkeyed(knobs, cfg)
    if arm == "benign":
        knobs = {k: v for k, v in knobs.items() if not k.startswith("attack.") and k != "users.malicious_fraction"}
        knobs["attack.success"] = make_attack(cfg).success_definition()
    return knobs


def code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout (``None`` outside one): an MLflow run's tag, and
    part of a cell's key when the user asks (then every commit makes new cells)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cell_key(cfg: Config, arm: str, code: str | None = None) -> str:
    """``<arm>|seed <seed>|<hash of cell_config (and the code version, when given)>``."""
    config = cell_config(cfg, arm) | ({"code": code} if code else {})
    return f"{arm}|seed {cfg.seed}|{config_hash(config)}"


@dataclass(frozen=True)
class Cell:
    """One run of ``arm`` under ``cfg`` (seed included), shown under ``label``; ``key``: see :func:`cell_key`."""

    arm: str
    label: str
    seed: int
    key: str
    cfg: Config = field(compare=False, repr=False)

    def spec(self) -> str:
        """What the shared queue's row says of the cell (for people reading the table)."""
        return json.dumps({"arm": self.arm, "label": self.label, "seed": self.seed})


def expand(base: Config, settings: Sequence[Setting], seeds: Sequence[int], arms: Sequence[str],
           code: str | None = None) -> list[Cell]:
    """Every (setting, seed, arm) cell, each config validated and every arm checked against it before
    anything runs; two settings that resolve to one config, and a grid of no cell, are refused."""
    arms = check_arms(base, arms)
    if not settings or not seeds or not arms:
        raise ConfigError("--grid: the grid has no cell (no setting, seed or arm)")
    cells, seen = [], {}
    for setting in settings:
        cfg = with_overrides(base, setting.overrides)
        check_arms(cfg, arms)
        resolved = config_hash({k: v for k, v in cfg.flat().items() if not k.startswith(("tracking.", "report."))})
        if seen.setdefault(resolved, setting.label) != setting.label:
            raise ConfigError(f"--grid: {seen[resolved]!r} and {setting.label!r} are the same config")
        for seed in seeds:
            seeded = dataclasses.replace(cfg, seed=seed)
            cells += [Cell(arm, setting.label, seed, cell_key(seeded, arm, code), seeded) for arm in arms]
    return cells
