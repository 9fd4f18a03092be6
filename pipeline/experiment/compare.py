"""Every defense on the same data, attack and seeds: ``auror compare``.

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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.checkpoint import write_atomic  # noqa: E402
from pipeline.defenses import REGISTRY  # noqa: E402
from pipeline.experiment.config import Config, ConfigError, load_config  # noqa: E402
from pipeline.experiment.report import benign_key  # noqa: E402

log = logging.getLogger("auror")

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


def run_cells(params: str | None, overrides: list[str], seeds: list[int], arms: list[str], track: bool = True) -> Path:
    """Run every (arm, setting, seed) cell not finished yet (each an MLflow run when ``track``);
    return the cells' folder."""
    from pipeline.experiment.run import check_arms, run_experiment

    base = load_config(params, overrides)
    root = Path(base.tracking.reports_dir) / "compare" / base.data.name
    configs = {s.label: load_config(params, [*overrides, *s.overrides]) for s in SETTINGS}
    arms = check_arms(base, arms)
    for cfg in configs.values():  # every setting valid for every arm before any run
        check_arms(cfg, arms)
    todo = [(arm, label, seed) for arm in arms for label in configs for seed in seeds
            if str(seed) not in load_cells(root, arm).get(label, {})]
    log.info("compare %s: %d cells to run (%d arms x %d settings x %d seeds, finished ones skipped); cells in %s",
             base.data.name, len(todo), len(arms), len(configs), len(seeds), root)
    # benign cells of settings that differ only in who attacks: run once
    shared = {(benign_key(configs[label]), int(seed)): metrics
              for label, by_seed in load_cells(root, "benign").items() if label in configs
              for seed, metrics in by_seed.items()}
    for done, (arm, label, seed) in enumerate(todo, 1):
        cfg = configs[label]
        key = (benign_key(cfg), seed)
        if arm == "benign" and key in shared:
            metrics = shared[key]
        else:
            log.info("== cell %d/%d: %s, %s, seed %d", done, len(todo), arm, label, seed)
            runs = Path(base.tracking.reports_dir) / "compare-runs" / base.data.name / _slug(label)
            run_cfg = load_config(params, [*overrides, *_setting(label).overrides, f"seed={seed}",
                                           f"tracking.reports_dir={runs}"])
            metrics = run_experiment(run_cfg, [seed], track=track, arms=[arm])[arm]
            if arm == "benign":
                shared[key] = metrics
        cells = load_cells(root, arm)
        cells.setdefault(label, {})[str(seed)] = metrics
        save_cells(root, arm, cells)
    return root


def _setting(label: str) -> CompareSetting:
    return next(s for s in SETTINGS if s.label == label)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def summarise(root: Path, arms: list[str], seeds: list[int]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{arm: {setting: {metric: mean over seeds}}}`` for the settings whose benign
    cells and this arm's cells are finished for every seed; the accuracy drop is
    against the benign arm of the same setting and seed."""
    benign = load_cells(root, "benign")
    table: dict[str, dict[str, dict]] = {}
    for arm in arms:
        cells = load_cells(root, arm)
        for s in SETTINGS:
            seeds_done = [str(x) for x in seeds if str(x) in cells.get(s.label, {}) and str(x) in benign.get(s.label, {})]
            if len(seeds_done) < len(seeds):
                continue
            rows = [dict(cells[s.label][x], accuracy_drop=benign[s.label][x]["accuracy"] - cells[s.label][x]["accuracy"])
                    for x in seeds_done]
            table.setdefault(arm, {})[s.label] = {m: _mean([r[m] for r in rows]) for m in SHOWN}
    return table


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def write_compare_report(table: dict, cfg: Config, seeds: list[int], command: str) -> Path:
    """``compare_<dataset>.md``, ``.json`` and the heatmap ``.png`` under ``tracking.reports_dir``."""
    reports = Path(cfg.tracking.reports_dir)
    name = cfg.data.name
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"compare_{name}.json").write_text(json.dumps(table, indent=2) + "\n")
    png = plot_heatmap(table, reports / f"compare_{name}.png",
                       f"{name}: {cfg.users.num_users} users, {cfg.attack.source_class} -> {cfg.attack.target_class}, "
                       f"mean over seeds {', '.join(map(str, seeds))}")
    d = cfg.report.decimals
    settings = [s.label for s in SETTINGS if any(s.label in row for row in table.values())]
    lines = [f"# {name}: every defense against targeted poisoning ({cfg.attack.source_class} -> "
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
    md = reports / f"compare_{name}.md"
    md.write_text("\n".join(lines))
    return md


def plot_heatmap(table: dict, path: Path, title: str) -> Path:
    """Four heatmaps (accuracy, SR, DR, FPR): defenses down, settings across; blank: not defined."""
    arms = list(table)
    settings = [s.label for s in SETTINGS if any(s.label in row for row in table.values())]
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


def run_compare(params: str | None, overrides: list[str], seeds: list[int], arms: list[str] | None, command: str,
                report_only: bool = False, track: bool = True, report: bool = True) -> Path | None:
    """Run the missing cells (unless ``report_only``), then (when ``report``) write the report from the
    finished ones and return its Markdown path."""
    base = load_config(params, overrides)
    arms = arms or default_arms()
    root = Path(base.tracking.reports_dir) / "compare" / base.data.name
    if not report_only:
        run_cells(params, overrides, seeds, arms, track)
    if not report:
        return None
    table = summarise(root, [a for a in default_arms() if a in arms], seeds)
    if not table:
        raise ConfigError(f"--report-only: no arm has finished cells for seeds {' '.join(map(str, seeds))} under "
                          f"{root} (and its benign cells); run auror compare without --report-only first")
    return write_compare_report(table, base, seeds, command)
