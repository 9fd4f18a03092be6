"""Every defense on the same data, attack and seeds (``auror compare``), and any grid (``auror sweep``).

Settings: IID with 10, 20 and 30% malicious users, and Dirichlet(0.5) at 30%.
Each (arm, setting, seed) is one *cell*: one run of one arm (an MLflow run).
The benign and attack arms are shared by every defense (run once per setting
and seed; the benign arm once for the settings that differ only in who attacks).

Each arm's finished cells are kept in ``<reports_dir>/compare/<dataset>/<arm>.json``
(``{setting: {seed: metrics}}``), rewritten atomically after every cell (each
cell's own run outputs go to ``<reports_dir>/compare-runs/``), so
an interrupted comparison resumes where it stopped and a DVC stage per
(dataset, defense) reruns only its own arm. The report,
``<reports_dir>/compare_<dataset>.md`` / ``.json`` / ``.png``, is built from the
finished cells: the mean over seeds, with each defense's accuracy drop against
the benign arm of the same setting and seed.

Cells are claimed from a sweep (:mod:`pipeline.experiment.sweep`): workers on
one or many machines pointed at the same storage split them. ``auror sweep``
runs the same cells over any ``--grid key=v1,v2 ...`` instead of the four
settings, and reports from the sweep's table.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.checkpoint import write_atomic  # noqa: E402
from pipeline.experiment.config import Config, ConfigError, load_config  # noqa: E402
from pipeline.experiment.sweep import DEFAULT_STORAGE, Cell, CellsFailed, Sweep, config_hash, work  # noqa: E402

log = logging.getLogger("auror")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a sweep's name names its report files
SHOWN = ("accuracy", "attack_success_rate", "accuracy_drop", "detection_rate", "false_positive_rate")


@dataclass(frozen=True)
class CompareSetting:
    label: str
    overrides: list[str] = field(default_factory=list)


SETTINGS = (
    CompareSetting("IID 10%", ["users.partition=iid", "users.malicious_fraction=0.1"]),
    CompareSetting("IID 20%", ["users.partition=iid", "users.malicious_fraction=0.2"]),
    CompareSetting("IID 30%", ["users.partition=iid", "users.malicious_fraction=0.3"]),
    CompareSetting("Dirichlet(0.5) 30%", ["users.partition=dirichlet", "users.dirichlet_alpha=0.5",
                                          "users.malicious_fraction=0.3"]),
)


def default_arms() -> list[str]:
    """benign, attack, then every registered defense."""
    from pipeline.experiment.run import ARMS

    return list(ARMS)


def cells_path(root: Path, arm: str) -> Path:
    return root / f"{arm}.json"


def load_cells(root: Path, arm: str) -> dict[str, dict[str, dict]]:
    path = cells_path(root, arm)
    return json.loads(path.read_text()) if path.is_file() else {}


def save_cells(root: Path, arm: str, cells: dict) -> None:
    text = (json.dumps(cells, indent=1, sort_keys=True) + "\n").encode()
    write_atomic(cells_path(root, arm), lambda f: f.write(text))


def cell_config(cfg: Config, arm: str) -> dict:
    """What a cell's metrics depend on: the config less where it writes, the device (a sweep may
    span machines) and the other defenses' sections; for the benign arm, less the attack and who
    attacks too, so settings that differ only there share one benign cell."""
    from pipeline.experiment.run import arm_params

    knobs = {k: v for k, v in arm_params(cfg, arm).items()
             if not k.startswith(("tracking.", "report.")) and k != "training.device"}
    if arm == "benign":
        knobs = {k: v for k, v in knobs.items() if not k.startswith("attack.") and k != "users.malicious_fraction"}
    return knobs


def record_cells(root: Path, cells: list[Cell], results: dict[str, dict]) -> None:
    """Write the finished ``cells`` (their metrics in ``results``, by key) into their arms' JSON files."""
    for arm in dict.fromkeys(c.arm for c in cells if c.key in results):
        by_label = load_cells(root, arm)
        for cell in (c for c in cells if c.arm == arm and c.key in results):
            by_label.setdefault(cell.label, {})[str(cell.seed)] = results[cell.key]
        save_cells(root, arm, by_label)


def plan_cells(params: str | None, overrides: list[str], settings: list[CompareSetting], seeds: list[int],
               arms: list[str], skip: Callable[[str, str, int], bool] = lambda arm, label, seed: False) -> list[Cell]:
    """Every (arm, setting, seed) cell, after checking that every arm can run every setting; ``skip``
    leaves out cells already recorded elsewhere."""
    from pipeline.experiment.run import check_arms

    for s in settings:
        check_arms(load_config(params, [*overrides, *s.overrides]), arms)
    cells = []
    for arm in arms:
        for s in settings:
            for seed in seeds:
                if not skip(arm, s.label, seed):
                    extra = (*s.overrides, f"seed={seed}")
                    cfg = load_config(params, [*overrides, *extra])
                    cells.append(Cell(arm, s.label, seed, extra, config_hash(cell_config(cfg, arm))))
    return cells


def run_sweep_cells(params: str | None, overrides: list[str], cells: list[Cell], sweep: Sweep, track: bool,
                    on_done: Callable[[Cell, dict], None] = lambda cell, metrics: None) -> None:
    """Run ``cells`` with every other worker of ``sweep``; raise :class:`CellsFailed` if any failed."""
    from pipeline.experiment.run import run_experiment

    base = load_config(params, overrides)

    def run_cell(cell: Cell) -> dict:
        # each cell writes its own run outputs: workers on one machine never share a file
        out = (Path(base.tracking.reports_dir) / "compare-runs" / base.data.name / _slug(cell.label)
               / f"{cell.arm}-seed{cell.seed}")
        cfg = load_config(params, [*overrides, *cell.overrides, f"tracking.reports_dir={out}"])
        return run_experiment(cfg, [cell.seed], track=track, arms=[cell.arm])[cell.arm]

    work(sweep, cells, run_cell, on_done)
    failed = [r for r in sweep.rows([c.key for c in cells]) if r["state"] == "failed"]
    if failed:
        raise CellsFailed(f"{len(failed)} cell(s) of sweep {sweep.name} failed, e.g. {failed[0]['key']}: "
                          f"{failed[0]['result']}; run the same command again to retry them")


def run_cells(params: str | None, overrides: list[str], seeds: list[int], arms: list[str], track: bool = True,
              storage: str | None = None, sweep_name: str | None = None) -> Path:
    """Run every (arm, setting, seed) cell not in the cells' JSON files yet, claimed from the sweep
    ``sweep_name`` (default ``compare-<dataset>``) in ``storage`` with any other worker; record
    every finished cell of the sweep in the JSON files. Returns the cells' folder."""
    from pipeline.experiment.run import check_arms

    base = load_config(params, overrides)
    root = Path(base.tracking.reports_dir) / "compare" / base.data.name
    arms = check_arms(base, arms)
    recorded = {arm: load_cells(root, arm) for arm in arms}
    cells = plan_cells(params, overrides, list(SETTINGS), seeds, arms,
                       skip=lambda arm, label, seed: str(seed) in recorded[arm].get(label, {}))
    sweep = Sweep(storage or DEFAULT_STORAGE, sweep_name or f"compare-{base.data.name}")
    log.info("compare %s: %d cells to run (%d arms x %d settings x %d seeds, recorded ones skipped; cells that "
             "share a run counted once: %d); cells in %s", base.data.name, len(cells), len(arms), len(SETTINGS),
             len(seeds), len({c.key for c in cells}), root)

    def record(done: Cell, metrics: dict) -> None:  # every cell sharing the run (the benign arm's settings)
        record_cells(root, [c for c in cells if c.key == done.key], {done.key: metrics})

    try:
        run_sweep_cells(params, overrides, cells, sweep, track, record)
    finally:  # also the cells other workers finished
        record_cells(root, cells, sweep.results([c.key for c in cells]))
    return root


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def summarise(cells: dict[str, dict[str, dict[str, dict]]], labels: list[str],
              seeds: list[int]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{arm: {setting: {metric: mean over seeds}}}`` from ``{arm: {setting: {seed: metrics}}}``, for the
    settings an arm finished for every seed; the accuracy drop is against the benign arm of the same
    setting and seed (``None`` without its cells)."""
    benign = cells.get("benign", {})
    table: dict[str, dict[str, dict]] = {}
    for arm, by_label in cells.items():
        for label in labels:
            done = by_label.get(label, {})
            if not all(str(x) in done for x in seeds):
                continue
            rows = []
            for x in map(str, seeds):
                reference = benign.get(label, {}).get(x)
                drop = None if reference is None else reference["accuracy"] - done[x]["accuracy"]
                rows.append(dict(done[x], accuracy_drop=drop))
            table.setdefault(arm, {})[label] = {m: _mean([r[m] for r in rows]) for m in SHOWN}
    return table


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def write_compare_report(table: dict, cfg: Config, labels: list[str], seeds: list[int], command: str,
                         stem: str | None = None) -> Path:
    """``<stem>.md``, ``.json`` and the heatmap ``.png`` (default stem ``compare_<dataset>``) under
    ``tracking.reports_dir``; one column per setting of ``labels`` that has results."""
    reports = Path(cfg.tracking.reports_dir)
    name = cfg.data.name
    stem = stem or f"compare_{name}"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{stem}.json").write_text(json.dumps(table, indent=2) + "\n")
    settings = [label for label in labels if any(label in row for row in table.values())]
    png = plot_heatmap(table, settings, reports / f"{stem}.png",
                       f"{name}: {cfg.users.num_users} users, {cfg.attack.source_class} -> {cfg.attack.target_class}, "
                       f"mean over seeds {', '.join(map(str, seeds))}")
    d = cfg.report.decimals
    lines = [f"# {name}: defenses against targeted poisoning ({cfg.attack.source_class} -> "
             f"{cfg.attack.target_class})", "",
             f"Produced by `{command}` (seeds {', '.join(map(str, seeds))}; mean over seeds; "
             f"{cfg.users.num_users} users, {cfg.training.rounds} rounds).", "",
             "Each cell: accuracy / SR / AD / DR / FPR. SR: attack success rate; AD: accuracy drop against the "
             "benign arm (same setting and seed); DR / FPR: detection / false-positive rate (AUROR: of its "
             "flags, once per run; defenses that leave users out round by round: averaged over rounds; "
             "`-` for aggregators that leave nobody out).", "",
             "| defense | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for arm, row in table.items():
        cells = []
        for label in settings:
            m = row.get(label)
            cells.append("" if m is None else " / ".join("-" if m[k] is None else f"{m[k]:.{d}f}" for k in SHOWN))
        label = {"benign": "benign (no attack)", "attack": "none (attack, no defense)"}.get(arm, arm)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"![defenses x settings]({png.name})", ""]
    md = reports / f"{stem}.md"
    md.write_text("\n".join(lines))
    return md


def plot_heatmap(table: dict, settings: list[str], path: Path, title: str) -> Path:
    """Four heatmaps (accuracy, SR, DR, FPR): defenses down, settings across; blank: not defined."""
    arms = list(table)
    panels = [("accuracy", "accuracy", "viridis"), ("attack_success_rate", "attack success rate", "magma_r"),
              ("detection_rate", "detection rate", "viridis"), ("false_positive_rate", "false-positive rate",
                                                                 "magma_r")]
    fig, axes = plt.subplots(1, 4, figsize=(4 * 3.2, 0.45 * len(arms) + 2.2), sharey=True)
    for ax, (metric, label, cmap) in zip(axes, panels):
        values = np.array([[np.nan if table[a].get(s, {}).get(metric) is None else table[a][s][metric]
                            for s in settings] for a in arms], dtype=float)
        ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if (v < 0.5) == (cmap == "viridis") else "black")
        ax.set_xticks(range(len(settings)), settings, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    axes[0].set_yticks(range(len(arms)), arms, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recorded_cells(root: Path, arms: list[str]) -> dict[str, dict[str, dict[str, dict]]]:
    return {arm: load_cells(root, arm) for arm in arms}


def run_compare(params: str | None, overrides: list[str], seeds: list[int], arms: list[str] | None, command: str,
                report_only: bool = False, track: bool = True, report: bool = True, storage: str | None = None,
                sweep_name: str | None = None) -> Path | None:
    """Run the missing cells (unless ``report_only``; with the other workers of the sweep), then (when
    ``report``) write the report from the finished ones and return its Markdown path."""
    base = load_config(params, overrides)
    arms = arms or default_arms()
    root = Path(base.tracking.reports_dir) / "compare" / base.data.name
    if not report_only:
        run_cells(params, overrides, seeds, arms, track, storage, sweep_name)
    if not report:
        return None
    labels = [s.label for s in SETTINGS]
    table = summarise(recorded_cells(root, [a for a in default_arms() if a in arms]), labels, seeds)
    if "benign" not in table:  # every accuracy drop is against it
        raise ConfigError(f"--report-only: no arm has finished cells for seeds {' '.join(map(str, seeds))} under "
                          f"{root} (and its benign cells); run auror compare without --report-only first")
    return write_compare_report(table, base, labels, seeds, command)


def grid_settings(grid: list[str]) -> list[CompareSetting]:
    """``["key=v1,v2", ...]`` as one setting per combination of values (commas inside [...] kept)."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        parts = re.split(r",(?![^\[]*\])", values)
        if not sep or not key or not all(parts):
            raise ConfigError(f"--grid: expected KEY=V1,V2,... (e.g. users.malicious_fraction=0.1,0.3), got {item!r}")
        axes.append([(key, v) for v in parts])
    return [CompareSetting(", ".join(f"{k}={v}" for k, v in combo), [f"{k}={v}" for k, v in combo])
            for combo in itertools.product(*axes)]


def run_grid(params: str | None, overrides: list[str], grid: list[str], seeds: list[int], arms: list[str],
             command: str, track: bool = True, storage: str | None = None, sweep_name: str | None = None) -> Path:
    """``auror sweep``: every arm on every combination of the ``grid`` values and every seed, cells claimed
    from the sweep ``sweep_name`` (default ``sweep-<dataset>``) with any other worker; the report
    ``<reports_dir>/<sweep_name>.md/.json/.png`` from the sweep's finished cells (every worker's)."""
    from pipeline.experiment.run import check_arms

    base = load_config(params, overrides)
    name = sweep_name or f"sweep-{base.data.name}"
    if not NAME.match(name):
        raise ConfigError(f"--sweep-name: letters, digits, '.', '_' and '-' only, got {name!r}")
    settings = grid_settings(grid)
    arms = check_arms(base, arms)
    cells = plan_cells(params, overrides, settings, seeds, arms)
    sweep = Sweep(storage or DEFAULT_STORAGE, name)
    log.info("sweep %s: %d cells (%d settings x %d arms x %d seeds; cells that share a run counted once: %d)",
             name, len(cells), len(settings), len(arms), len(seeds), len({c.key for c in cells}))
    run_sweep_cells(params, overrides, cells, sweep, track)
    finished = sweep.results([c.key for c in cells])
    by_arm: dict[str, dict[str, dict]] = {}
    for cell in cells:
        by_arm.setdefault(cell.arm, {}).setdefault(cell.label, {})[str(cell.seed)] = finished[cell.key]
    labels = [s.label for s in settings]
    return write_compare_report(summarise(by_arm, labels, seeds), base, labels, seeds, command, stem=name)
