"""Every defense against every attack on the same data and seeds (``auror compare``), and any grid
(``auror sweep``): presets over the one model of the work (:mod:`pipeline.experiment.grid`).

The comparison's settings (:data:`~pipeline.experiment.grid.COMPARE_SETTINGS`): label flipping (the
paper's attack) at IID with 10, 20 and 30% malicious users and Dirichlet(0.5) at 30%; every other
attack at IID 30% and Dirichlet(0.5) 30%. Each cell is one run of one arm (an MLflow run), keyed by
its resolved config: the benign arm is one cell for the settings that differ only in who attacks
and how (while the attack's success is measured the same way), and a changed config is new cells.

Cells are claimed from a sweep (:mod:`pipeline.experiment.queue`): workers on one or many machines
pointed at the same storage split them. Finished cells are kept in the results store
(:mod:`pipeline.experiment.store`): ``<reports_dir>/compare/<dataset>/<attack>/<arm>.json`` for a
comparison (one DVC stage per (attack, arm) reruns only its cells), ``<reports_dir>/sweeps/<name>/``
for a sweep. The report, ``compare_<dataset>.md`` / ``.json`` / ``.png`` (a sweep's: ``<name>.*``), is a
view over the store: the mean over seeds of the cells of this config, each arm's accuracy drop
against the benign arm of the same setting and seed, and the cells not recorded yet named.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.defenses import REGISTRY as DEFENSES
from pipeline.core.metrics import accuracy_drop, attack_success
from pipeline.core.sampling import round_size
from pipeline.experiment.arms import ARMS, build_datamodule
from pipeline.experiment.config import Config, ConfigError, check_name
from pipeline.experiment.grid import Cell, Setting, attack_settings, expand, parse_grid
from pipeline.experiment.storage import SWEEP_STORAGE
from pipeline.experiment.store import ResultsStore, check_report, report_config, write_report_file
from pipeline.lazy import OnFirstUse

# the work queue, MLflow and matplotlib load when cells run or a report is drawn: a refused grid needs none
queue, tracking, plots = (OnFirstUse(f"pipeline.experiment.{name}") for name in ("queue", "tracking", "plots"))

log = logging.getLogger("auror")

SHOWN = ("accuracy", "attack_success_rate", "accuracy_drop", "detection_rate", "false_positive_rate")


def default_attacks() -> list[str]:
    """label_flip first (the paper's attack), then every other registered attack."""
    return ["label_flip", *(name for name in ATTACKS if name != "label_flip")]


def check_attacks(attacks: list[str]) -> list[str]:
    """``attacks`` in report order; a one-line :class:`ConfigError` for an unknown one."""
    known = default_attacks()
    for attack in attacks:
        if attack not in known:
            raise ConfigError(f"--attacks: must be registered attacks ({', '.join(known)}), got {attack!r}")
    return [a for a in known if a in attacks]


class Grid:
    """A planned grid: its cells by group (a comparison's attack; a sweep's one group), the labels of
    each group's settings, the store its results go to and the report that views them. The report has a
    section per attack: a comparison's groups, or the attacks a sweep's settings name (its base attack
    where they name none)."""

    def __init__(self, base: Config, groups: dict[str, list[Setting]], seeds: list[int], arms: list[str],
                 store: Path, report: Path, code: str | None = None) -> None:
        self.base, self.seeds, self.store, self.report = base, seeds, ResultsStore(store), report
        self.cells = {group: expand(base, settings, seeds, arms, code) for group, settings in groups.items()}
        self.labels = {group: [s.label for s in settings] for group, settings in groups.items()}
        self.sections = {group: attack_sections(settings, base.attack.name) for group, settings in groups.items()}
        self.config = report_config(base)

    def check_report(self, elsewhere: str) -> None:
        check_report(_file(self.report, ".json"), self.config, elsewhere)

    def recorded(self) -> dict[str, dict[str, dict]]:
        return {group: self.store.results(group, cells) for group, cells in self.cells.items()}

    def run(self, storage: str | None, sweep_name: str, track: bool) -> None:
        """Run the cells not recorded yet with every other worker of the sweep; record each as it finishes
        (and, at the end, every cell another worker finished)."""
        recorded = self.recorded()
        todo = {c.key: c for group, cells in self.cells.items() for c in cells if c.key not in recorded[group]}
        for cfg in {(repr(c.cfg.data), repr(c.cfg.users)): c.cfg for c in todo.values()}.values():
            build_datamodule(cfg, poison=False)  # a missing dataset or a bad partition, refused before any cell
        sweep = queue.Sweep(storage or SWEEP_STORAGE, sweep_name)
        if track and self.base.tracking.tracking_uri.startswith(("http://", "https://")):  # once, before any cell
            tracking.check_tracking_server(self.base.tracking.tracking_uri, self.base.tracking.experiment)
        log.info("%s: %d cells to run (%d recorded; cells that share a run counted once); results in %s", sweep_name,
                 len(todo), sum(len(r) for r in recorded.values()), self.store.root)

        def record(results: dict[str, dict]) -> None:
            for group, cells in self.cells.items():
                self.store.record(group, cells, results)

        try:
            queue.run_cells(list(todo.values()), sweep, track, lambda cell, metrics: record({cell.key: metrics}))
        finally:  # also the cells other workers finished
            record(sweep.results(list(todo)))

    def write_report(self, command: str, kinds: dict[str, str] | None = None) -> Path:
        """The report over the recorded cells; refused when none is recorded."""
        recorded = self.recorded()
        tables = {group: summarise(self.cells[group], recorded[group], self.seeds) for group in self.cells}
        tables = {group: table for group, table in tables.items() if table}
        if not tables:
            raise ConfigError(f"--report-only: no cell of this config is recorded for seeds "
                              f"{' '.join(map(str, self.seeds))} in {self.store.root}; run without --report-only first")
        missing = [c for group in tables for c in self.cells[group] if c.key not in recorded[group]]
        absent = [group for group in self.cells if group not in tables]
        sections = {attack: (group, labels) for group in tables for attack, labels in self.sections[group].items()}
        tables = {attack: table for attack, (group, labels) in sections.items()
                  if (table := section_table(tables[group], labels))}
        labels = {attack: labels for attack, (_, labels) in sections.items()}
        return write_compare_report(tables, self.base, labels, self.seeds, command, self.report, self.config,
                                    missing, absent)


def attack_sections(settings: list[Setting], base_attack: str) -> dict[str, list[str]]:
    """``{attack: the labels of its settings}``, in the grid's order: the attack a setting's ``attack.name``
    names, else ``base_attack``."""
    sections: dict[str, list[str]] = {}
    for s in settings:
        named = [o.partition("=")[2] for o in s.overrides if o.partition("=")[0] == "attack.name"]
        sections.setdefault(named[-1] if named else base_attack, []).append(s.label)
    return sections


def section_table(table: dict[str, dict], labels: list[str]) -> dict[str, dict]:
    """The rows of ``table`` (``{arm: {label: metrics}}``) restricted to ``labels``; arms with none left out."""
    return {arm: kept for arm, row in table.items() if (kept := {label: row[label] for label in labels if label in row})}


def compare_grid(base: Config, seeds: list[int], arms: list[str] | None, attacks: list[str] | None,
                 name: str | None = None, code: str | None = None) -> Grid:
    """The comparison of ``attacks`` (default: every registered one) x ``arms`` (default: every arm) x seeds."""
    attacks = check_attacks(attacks or default_attacks())
    reports = Path(base.tracking.reports_dir)
    stem = check_name("--name", name) if name else f"compare_{base.data.name}"
    return Grid(base, {a: attack_settings(a) for a in attacks}, seeds, arms or list(ARMS),
                reports / "compare" / base.data.name, reports / stem, code)


def sweep_grid(base: Config, grid: list[str], seeds: list[int], arms: list[str], name: str | None,
               code: str | None = None) -> Grid:
    """``auror sweep``: every arm on every combination of the ``grid`` values and every seed."""
    name = check_name("--sweep-name", name or f"sweep-{base.data.name}")
    reports = Path(base.tracking.reports_dir)
    return Grid(base, {base.attack.name: parse_grid(grid)}, seeds, arms, reports / "sweeps" / name, reports / name, code)


def summarise(cells: list[Cell], results: dict[str, dict], seeds: list[int]) -> dict[str, dict[str, dict]]:
    """``{arm: {label: {metric: mean over seeds, "seeds": how many}}}`` over the recorded ``cells`` (a
    comparison still running shows its finished seeds; the report marks the cells with fewer); the
    accuracy drop is against the benign cell of the same setting and seed (``None`` without it)."""
    benign = {(c.label, c.seed): results[c.key]["accuracy"] for c in cells if c.arm == "benign" and c.key in results}
    rows: dict[str, dict[str, list[dict]]] = {}
    for c in cells:
        if c.key in results:
            drop = accuracy_drop(benign.get((c.label, c.seed)), results[c.key]["accuracy"])
            rows.setdefault(c.arm, {}).setdefault(c.label, []).append(dict(results[c.key], accuracy_drop=drop))
    arms, labels = dict.fromkeys(c.arm for c in cells), dict.fromkeys(c.label for c in cells)  # the grid's order
    return {arm: {label: {**{m: _mean([r[m] for r in rows[arm][label]]) for m in SHOWN},
                          "seeds": len(rows[arm][label])} for label in labels if label in rows[arm]}
            for arm in arms if arm in rows}


def _file(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)  # a sweep's name may hold dots


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def write_compare_report(tables: dict[str, dict], cfg: Config, labels: dict[str, list[str]], seeds: list[int],
                         command: str, stem: Path, config: dict, missing: list[Cell], absent: list[str]) -> Path:
    """``<stem>.md``, ``.json`` (``{"config": the config shown, "results": {attack: {arm: {setting: metrics}}},
    "missing": the cells not recorded}``) and the heatmap ``.png``: one table per attack of ``tables``, with
    a column per setting of ``labels[attack]`` that has results; ``absent``: the groups with no cell."""
    reports, name = stem.parent, cfg.data.name
    reports.mkdir(parents=True, exist_ok=True)
    gaps = [{"arm": c.arm, "setting": c.label, "seed": c.seed, "key": c.key} for c in missing]
    write_report_file(_file(stem, ".json"), json.dumps({"config": config, "results": tables, "missing": gaps},
                                                       indent=2) + "\n")
    shown = {attack: [label for label in labels[attack] if any(label in row for row in table.values())]
             for attack, table in tables.items()}
    partial = any(m["seeds"] < len(seeds) for t in tables.values() for row in t.values() for m in row.values())
    png = plot_heatmap(tables, shown, _file(stem, ".png"),
                       f"{name}: {setting_summary(cfg)}, mean over seeds {', '.join(map(str, seeds))}"
                       + (" (some cells over fewer seeds: see the tables)" if partial else ""))
    d = cfg.report.decimals
    lines = [f"# {name}: defenses against attacks", "",
             f"Produced by `{command}` (seeds {', '.join(map(str, seeds))}; mean over seeds; "
             f"{setting_summary(cfg, rounds=True)}; config {config['hash']}, every value in "
             f"`{_file(stem, '.json').name}`).", "",
             "Each cell: accuracy / SR / AD / DR / FPR. SR: the attack's success rate (label flipping and "
             "`auror_adaptive`: source-class test inputs classified as the target; backdoors: triggered test "
             "inputs of the other classes classified as the target; `-` for untargeted attacks, whose success "
             "is AD); AD: accuracy drop against the benign arm (same setting and seed); DR / FPR: detection / "
             f"false-positive rate ({flag_definitions()}; `-` for aggregators that leave nobody out).", ""]
    for attack, table in tables.items():
        if shown[attack]:
            lines += [f"## {attack} ({attack_kind(attack, cfg)})", "",
                      *attack_table(table, shown[attack], len(seeds), d), ""]
    if partial:
        lines += [f"A cell marked (n seeds) is the mean over the n of seeds {', '.join(map(str, seeds))} only: "
                  "its remaining cells have not run yet (the same `auror compare` command resumes them).", ""]
    if missing:
        shown_missing = ", ".join(f"{c.arm} / {c.label} / seed {c.seed}" for c in missing[:10])
        lines += [f"Not recorded yet ({len(missing)} cells; all in the JSON's `missing`): {shown_missing}"
                  + (", ..." if len(missing) > 10 else "") + ".", ""]
    if absent:
        lines += [f"No cell of this config is recorded for: {', '.join(absent)}.", ""]
    lines += [f"![defenses x attacks]({png.name})", ""]
    md = _file(stem, ".md")
    write_report_file(md, "\n".join(lines))
    return md


def setting_summary(cfg: Config, rounds: bool = False) -> str:
    """``"30 users"`` (and ``", 30 rounds"``), with what differs from the cross-silo FedAvg default: the users
    of a round, FedSGD, the server's optimiser."""
    text = f"{cfg.users.num_users} users"
    size = round_size(cfg.users.per_round, cfg.users.num_users)
    if size < cfg.users.num_users:
        text += f" ({size} per round{', attackers in every round' if cfg.attack.participation == 'every_round' else ''})"
    text += f", {cfg.training.rounds} rounds" if rounds else ""
    if cfg.training.algorithm != "fedavg":
        text += f", {cfg.training.algorithm.replace('fed', 'Fed').replace('sgd', 'SGD')}"
    if cfg.server.optimizer != "sgd" or cfg.server.lr != 1:
        text += f", server {cfg.server.optimizer} lr {cfg.server.lr:g}"
    return text


def flag_definitions() -> str:
    """Which DR / FPR definition each defense's row uses (:attr:`~pipeline.defenses.base.Defense.flags`)."""
    by_kind = {kind: ", ".join(name for name, d in DEFENSES.items() if d.flags == kind) for kind in ("run", "round")}
    return (f"of the users flagged over the run, for {by_kind['run']} (`auror_noniid`: its last round's flags); "
            f"averaged over rounds, for the defenses that leave users out round by round ({by_kind['round']})")


def attack_kind(attack: str, cfg: Config) -> str:
    """How a report names an attack's kind, for this config's variant of it (ALIE's can be a backdoor)."""
    kinds = {"source_to_target": f"targeted, {cfg.attack.source_class} -> {cfg.attack.target_class}",
             "backdoor": f"backdoor, target {cfg.attack.target_class}", "accuracy_drop": "untargeted: success is AD"}
    return kinds[ATTACKS[attack](getattr(cfg.attack, attack), cfg.attack).success_metric]


def attack_table(table: dict[str, dict], settings: list[str], num_seeds: int, decimals: int) -> list[str]:
    """One attack's Markdown table: a row per arm, a column per setting; a cell is accuracy / SR / AD / DR /
    FPR, marked "(n seeds)" when it holds fewer than ``num_seeds``."""
    lines = ["| defense | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for arm, row in table.items():
        cells = []
        for label in settings:
            m = row.get(label)
            partial = m is not None and m["seeds"] < num_seeds
            cells.append("" if m is None else " / ".join("-" if m[k] is None else f"{m[k]:.{decimals}f}" for k in SHOWN)
                         + (f" ({m['seeds']} seed{'s' if m['seeds'] > 1 else ''})" if partial else ""))
        label = {"benign": "benign (no attack)", "attack": "none (attack, no defense)"}.get(arm, arm)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot_heatmap(tables: dict[str, dict], shown: dict[str, list[str]], path: Path, title: str) -> Path:
    """Four heatmaps stacked (attack success: SR, or AD for untargeted attacks; accuracy; DR; FPR): defenses
    down, (attack, setting) across; blank: not defined or not run."""
    columns = [(attack, label) for attack, labels in shown.items() for label in labels]
    arms = list(dict.fromkeys(arm for table in tables.values() for arm in table))
    panels = [("success", "attack success (SR; AD when untargeted)", "magma_r"), ("accuracy", "accuracy", "viridis"),
              ("detection_rate", "detection rate", "viridis"), ("false_positive_rate", "false-positive rate", "magma_r")]
    fig, axes = plots.plt.subplots(4, 1, figsize=(max(6.0, 0.62 * len(columns) + 2.5), 4 * (0.32 * len(arms) + 1.2) + 1.5),
                             sharex=True)
    for ax, (metric, label, cmap) in zip(axes, panels):
        values = np.full((len(arms), len(columns)), np.nan)
        for i, arm in enumerate(arms):
            for j, (attack, setting) in enumerate(columns):
                m = tables[attack].get(arm, {}).get(setting)
                v = None if m is None else attack_success(m['attack_success_rate'], m['accuracy_drop']) if metric == "success" else m[metric]
                values[i, j] = np.nan if v is None else v
        ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if (v < 0.5) == (cmap == "viridis") else "black")
        ax.set_yticks(range(len(arms)), arms, fontsize=7)
        ax.set_title(label, fontsize=9)
    names = [", ".join(part for part in s.split(", ") if part != f"attack.name={a}") for a, s in columns]
    axes[-1].set_xticks(range(len(columns)), [f"{a}: {n}" if n else a for (a, _), n in zip(columns, names)],
                        rotation=40, ha="right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title above the first panel
    write_report_file(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plots.plt.close(fig)
    return path
