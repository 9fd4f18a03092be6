"""Every defense against every attack on the same data and seeds (``auror compare``), and any grid
(``auror sweep``).

Settings: label flipping (the paper's attack) at IID with 10, 20 and 30% malicious
users and Dirichlet(0.5) at 30%; every other attack at IID 30% and Dirichlet(0.5) 30%.
Each (attack, arm, setting, seed) is one *cell*: one run of one arm (an MLflow run).
The benign and attack arms are shared by every defense (run once per attack, setting
and seed; the benign arm once for the runs that differ only in who attacks and how,
as long as the attack's success is measured the same way).

Each (attack, arm)'s finished cells are kept in
``<reports_dir>/compare/<dataset>/<attack>/<arm>.json`` (``{setting: {seed: metrics}}``),
rewritten atomically after every cell (each cell's own run outputs go to
``<reports_dir>/compare-runs/``), so an interrupted comparison resumes where it
stopped and a DVC stage per (dataset, attack, defense) reruns only its own cells.
The report, ``<reports_dir>/compare_<dataset>.md`` / ``.json`` / ``.png``, is built
from the finished cells: the mean over seeds, with each arm's accuracy drop against
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
MATRIX_SETTINGS = (SETTINGS[2], SETTINGS[3])  # every attack but label flipping: IID and Dirichlet(0.5), 30%


def default_attacks() -> list[str]:
    """label_flip first (the paper's attack), then every other registered attack."""
    from pipeline.attacks import REGISTRY

    return ["label_flip", *(name for name in REGISTRY if name != "label_flip")]


def attack_settings(attack: str) -> list[CompareSetting]:
    """The settings of ``attack``'s cells, each with ``attack.name`` set."""
    return [CompareSetting(s.label, [f"attack.name={attack}", *s.overrides])
            for s in (SETTINGS if attack == "label_flip" else MATRIX_SETTINGS)]


def check_attacks(attacks: list[str]) -> list[str]:
    """``attacks`` in report order; a one-line :class:`ConfigError` for an unknown one."""
    known = default_attacks()
    for attack in attacks:
        if attack not in known:
            raise ConfigError(f"--attacks: must be registered attacks ({', '.join(known)}), got {attack!r}")
    return [a for a in known if a in attacks]


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
    if arm == "benign":  # nobody attacks: only how the attack's success is measured matters
        from pipeline.experiment.run import make_attack

        knobs = {k: v for k, v in knobs.items() if not k.startswith("attack.") and k != "users.malicious_fraction"}
        knobs["attack.success"] = make_attack(cfg).success_definition()
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


def run_cells(params: str | None, overrides: list[str], seeds: list[int], arms: list[str], attacks: list[str],
              track: bool = True, storage: str | None = None, sweep_name: str | None = None) -> Path:
    """Run every (attack, arm, setting, seed) cell not in the cells' JSON files yet, claimed from the sweep
    ``sweep_name`` (default ``compare-<dataset>``) in ``storage`` with any other worker; record
    every finished cell of the sweep in the JSON files. Returns the cells' folder (one folder per attack)."""
    from pipeline.experiment.run import check_arms

    base = load_config(params, overrides)
    root = Path(base.tracking.reports_dir) / "compare" / base.data.name
    arms = check_arms(base, arms)
    planned: list[tuple[str, Cell]] = []  # (attack, cell)
    for attack in attacks:
        recorded = {arm: load_cells(root / attack, arm) for arm in arms}
        planned += [(attack, cell) for cell in plan_cells(
            params, overrides, attack_settings(attack), seeds, arms,
            skip=lambda arm, label, seed: str(seed) in recorded[arm].get(label, {}))]
    cells = [cell for _, cell in planned]
    sweep = Sweep(storage or DEFAULT_STORAGE, sweep_name or f"compare-{base.data.name}")
    log.info("compare %s: %d cells to run (%d attacks x %d arms x their settings x %d seeds, recorded ones skipped; "
             "cells that share a run counted once: %d); cells in %s", base.data.name, len(cells), len(attacks),
             len(arms), len(seeds), len({c.key for c in cells}), root)

    def record(results: dict[str, dict]) -> None:  # every cell sharing a run (the benign arm's settings)
        for attack in attacks:
            record_cells(root / attack, [c for a, c in planned if a == attack], results)

    try:
        run_sweep_cells(params, overrides, cells, sweep, track, lambda done, metrics: record({done.key: metrics}))
    finally:  # also the cells other workers finished
        record(sweep.results([c.key for c in cells]))
    return root


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def summarise(cells: dict[str, dict[str, dict[str, dict]]], labels: list[str],
              seeds: list[int]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{arm: {setting: {metric: mean over seeds, "seeds": how many}}}`` from ``{arm: {setting: {seed:
    metrics}}}``, over the requested seeds an arm finished in that setting (a comparison still running
    shows its finished seeds; the report marks the cells with fewer); the accuracy drop is against the
    benign arm of the same setting and seed (``None`` without its cells)."""
    benign = cells.get("benign", {})
    table: dict[str, dict[str, dict]] = {}
    for arm, by_label in cells.items():
        for label in labels:
            done = [str(x) for x in seeds if str(x) in by_label.get(label, {})]
            if not done:
                continue
            rows = []
            for x in done:
                reference = benign.get(label, {}).get(x)
                drop = None if reference is None else reference["accuracy"] - by_label[label][x]["accuracy"]
                rows.append(dict(by_label[label][x], accuracy_drop=drop))
            table.setdefault(arm, {})[label] = {**{m: _mean([r[m] for r in rows]) for m in SHOWN}, "seeds": len(done)}
    return table


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def success_panel(metrics: dict) -> float | None:
    """An attack's success: its SR when targeted, the accuracy drop when untargeted (no SR)."""
    return metrics["accuracy_drop"] if metrics["attack_success_rate"] is None else metrics["attack_success_rate"]


def write_compare_report(tables: dict[str, dict], cfg: Config, labels: dict[str, list[str]], seeds: list[int],
                         command: str, stem: str | None = None) -> Path:
    """``<stem>.md``, ``.json`` (``{attack: {arm: {setting: metrics}}}``) and the heatmap ``.png`` (default
    stem ``compare_<dataset>``) under ``tracking.reports_dir``: one table per attack of ``tables``, with a
    column per setting of ``labels[attack]`` that has results."""
    from pipeline.attacks import REGISTRY as ATTACKS

    reports = Path(cfg.tracking.reports_dir)
    name = cfg.data.name
    stem = stem or f"compare_{name}"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{stem}.json").write_text(json.dumps(tables, indent=2) + "\n")
    shown = {attack: [label for label in labels[attack] if any(label in row for row in table.values())]
             for attack, table in tables.items()}
    partial = any(m["seeds"] < len(seeds) for t in tables.values() for row in t.values() for m in row.values())
    png = plot_heatmap(tables, shown, reports / f"{stem}.png",
                       f"{name}: {cfg.users.num_users} users, mean over seeds {', '.join(map(str, seeds))}"
                       + (" (some cells over fewer seeds: see the tables)" if partial else ""))
    d = cfg.report.decimals
    lines = [f"# {name}: defenses against attacks", "",
             f"Produced by `{command}` (seeds {', '.join(map(str, seeds))}; mean over seeds; "
             f"{cfg.users.num_users} users, {cfg.training.rounds} rounds).", "",
             "Each cell: accuracy / SR / AD / DR / FPR. SR: the attack's success rate (label flipping and "
             "`auror_adaptive`: source-class test inputs classified as the target; backdoors: triggered test "
             "inputs of the other classes classified as the target; `-` for untargeted attacks, whose success "
             "is AD); AD: accuracy drop against the benign arm (same setting and seed); DR / FPR: detection / "
             "false-positive rate (AUROR: of its flags, once per run; defenses that leave users out round by "
             "round: averaged over rounds; `-` for aggregators that leave nobody out).", ""]
    for attack, table in tables.items():
        settings = shown[attack]
        if not settings:
            continue
        kind = {"source_to_target": f"targeted, {cfg.attack.source_class} -> {cfg.attack.target_class}",
                "backdoor": f"backdoor, target {cfg.attack.target_class}", "accuracy_drop": "untargeted: success is AD"}
        metric = ATTACKS[attack](getattr(cfg.attack, attack), cfg.attack).success_metric  # this config's variant
        lines += [f"## {attack} ({kind[metric]})", "",
                  "| defense | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
        for arm, row in table.items():
            cells = []
            for label in settings:
                m = row.get(label)
                partial = m is not None and m["seeds"] < len(seeds)
                cells.append("" if m is None else " / ".join("-" if m[k] is None else f"{m[k]:.{d}f}" for k in SHOWN)
                             + (f" ({m['seeds']} seed{'s' if m['seeds'] > 1 else ''})" if partial else ""))
            label = {"benign": "benign (no attack)", "attack": "none (attack, no defense)"}.get(arm, arm)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if partial:
        lines += [f"A cell marked (n seeds) is the mean over the n of seeds {', '.join(map(str, seeds))} only: "
                  "its remaining cells have not run yet (the same `auror compare` command resumes them).", ""]
    lines += [f"![defenses x attacks]({png.name})", ""]
    md = reports / f"{stem}.md"
    md.write_text("\n".join(lines))
    return md


def plot_heatmap(tables: dict[str, dict], shown: dict[str, list[str]], path: Path, title: str) -> Path:
    """Four heatmaps stacked (attack success: SR, or AD for untargeted attacks; accuracy; DR; FPR): defenses
    down, (attack, setting) across; blank: not defined or not run."""
    columns = [(attack, label) for attack, labels in shown.items() for label in labels]
    arms = list(dict.fromkeys(arm for table in tables.values() for arm in table))
    panels = [("success", "attack success (SR; AD when untargeted)", "magma_r"), ("accuracy", "accuracy", "viridis"),
              ("detection_rate", "detection rate", "viridis"), ("false_positive_rate", "false-positive rate", "magma_r")]
    fig, axes = plt.subplots(4, 1, figsize=(max(6.0, 0.62 * len(columns) + 2.5), 4 * (0.32 * len(arms) + 1.2) + 1.5),
                             sharex=True)
    for ax, (metric, label, cmap) in zip(axes, panels):
        values = np.full((len(arms), len(columns)), np.nan)
        for i, arm in enumerate(arms):
            for j, (attack, setting) in enumerate(columns):
                m = tables[attack].get(arm, {}).get(setting)
                v = None if m is None else success_panel(m) if metric == "success" else m[metric]
                values[i, j] = np.nan if v is None else v
        ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if (v < 0.5) == (cmap == "viridis") else "black")
        ax.set_yticks(range(len(arms)), arms, fontsize=7)
        ax.set_title(label, fontsize=9)
    axes[-1].set_xticks(range(len(columns)), [f"{a}: {s}" for a, s in columns], rotation=40, ha="right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title above the first panel
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recorded_cells(root: Path, arms: list[str]) -> dict[str, dict[str, dict[str, dict]]]:
    return {arm: load_cells(root, arm) for arm in arms}


def run_compare(params: str | None, overrides: list[str], seeds: list[int], arms: list[str] | None, command: str,
                report_only: bool = False, track: bool = True, report: bool = True, storage: str | None = None,
                sweep_name: str | None = None, attacks: list[str] | None = None) -> Path | None:
    """Run the missing cells of ``attacks`` (default: every registered one; unless ``report_only``; with
    the other workers of the sweep), then (when ``report``) write the report from the finished cells of
    every attack and return its Markdown path."""
    base = load_config(params, overrides)
    arms = arms or default_arms()
    attacks = check_attacks(attacks or default_attacks())
    root = Path(base.tracking.reports_dir) / "compare" / base.data.name
    if not report_only:
        run_cells(params, overrides, seeds, arms, attacks, track, storage, sweep_name)
    if not report:
        return None
    labels = {attack: [s.label for s in attack_settings(attack)] for attack in default_attacks()}
    tables = {attack: summarise(recorded_cells(root / attack, [a for a in default_arms() if a in arms]),
                                labels[attack], seeds) for attack in default_attacks()}
    tables = {attack: table for attack, table in tables.items() if "benign" in table}  # every drop is against it
    if not tables:
        raise ConfigError(f"--report-only: no arm has finished cells for seeds {' '.join(map(str, seeds))} under "
                          f"{root} (and its benign cells); run auror compare without --report-only first")
    return write_compare_report(tables, base, labels, seeds, command)


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
    return write_compare_report({base.attack.name: summarise(by_arm, labels, seeds)}, base,
                                {base.attack.name: labels}, seeds, command, stem=name)
