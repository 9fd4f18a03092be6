"""The paper's experiments: run each setting (three arms), write a Markdown
table beside the paper's numbers and a plot of attack success against the
malicious fraction, with and without AUROR."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.core.metrics import accuracy_drop  # noqa: E402
from pipeline.experiment.config import Config, ConfigError  # noqa: E402
from pipeline.experiment.grid import Setting  # noqa: E402
from pipeline.experiment.store import check_report, report_config, write_report_file  # noqa: E402

PAPER_ARMS = ("benign", "attack", "auror")  # the paper's: M_B, M_P, M_A

# The paper's Tables 5 (MNIST, by malicious users) and 6 (GTSRB, by malicious data).
PAPER = {
    ("mnist", "users", 0.2): {"DR": 1.00, "SR": 0.38, "AD": 0.02},
    ("mnist", "users", 0.3): {"DR": 1.00, "SR": 0.69, "AD": 0.05},
    ("gtsrb", "data", 0.5): {"DR": 1.00, "SR": 0.16, "AD": 0.02},
    ("gtsrb", "data", 0.7): {"DR": 0.90, "SR": 0.22, "AD": 0.04},
    ("gtsrb", "data", 0.9): {"DR": 1.00, "SR": 0.32, "AD": 0.05},
    ("gtsrb", "data", 1.0): {"DR": 0.70, "SR": 0.13, "AD": 0.02},
}


@dataclass(frozen=True)
class PaperSetting(Setting):
    """A grid setting with the paper's numbers for it, and its place on the plot."""

    paper: dict | None = None
    malicious_fraction: float | None = None  # x of the plot, for the plain IID FedAvg rows


def paper_settings(cfg: Config) -> list[PaperSetting]:
    """Malicious users 30/20/10%; for GTSRB the poisoned fractions of Table 6;
    for MNIST DSSGD (theta_u = 0.1) and non-IID (Dirichlet 0.5) at 30%.
    The settings at 30% come first."""
    name = cfg.data.name
    settings = [
        PaperSetting(f"{f:.0%} malicious users", (f"users.malicious_fraction={f}",),
                PAPER.get((name, "users", f)), malicious_fraction=f)
        for f in ((0.2, 0.1) if name == "gtsrb" else (0.3, 0.2, 0.1))
    ]
    if name == "gtsrb":  # Table 6 first; its 100% row is also the 30%-users point of the plot
        settings[:0] = [
            PaperSetting(f"30% users, {p:.0%} of their source samples poisoned",
                         ("users.malicious_fraction=0.3", f"attack.poisoned_fraction={p}"), PAPER[(name, "data", p)],
                         malicious_fraction=0.3 if p == 1.0 else None)
            for p in (0.5, 0.7, 0.9, 1.0)
        ]
    if name == "mnist":  # after the 30% row: the must-show settings come first
        settings[1:1] = [
            PaperSetting("30% users, DSSGD theta_u = 0.1", ("users.malicious_fraction=0.3", "protocol.theta_u=0.1"),
                         PAPER[(name, "users", 0.3)]),
            PaperSetting("30% users, non-IID Dirichlet(0.5)",
                         ("users.malicious_fraction=0.3", "users.partition=dirichlet", "users.dirichlet_alpha=0.5")),
        ]
    return settings


COLUMNS = [
    ("benign acc", "benign", "accuracy"),
    ("attack SR", "attack", "attack_success_rate"),
    ("attack AD", "attack", "accuracy_drop"),
    ("AUROR DR", "auror", "detection_rate"),
    ("AUROR FPR", "auror", "false_positive_rate"),
    ("AUROR SR", "auror", "attack_success_rate"),
    ("AUROR AD", "auror", "accuracy_drop"),
]


def _cell(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def markdown_table(rows: list[tuple[PaperSetting, dict]], decimals: int = 3) -> str:
    """One row per setting: our metrics, then the paper's DR / SR / AD."""
    head = ["setting", *(c[0] for c in COLUMNS), "paper DR", "paper SR", "paper AD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, results in rows:
        ours = [_cell(results[arm][metric], decimals) for _, arm, metric in COLUMNS]
        paper = [_cell((setting.paper or {}).get(k), decimals) for k in ("DR", "SR", "AD")]
        lines.append("| " + " | ".join([setting.label, *ours, *paper]) + " |")
    return "\n".join(lines)


def plot_sr(rows: list[tuple[PaperSetting, dict]], path: Path, title: str) -> Path:
    points = sorted((s.malicious_fraction, r) for s, r in rows if s.malicious_fraction is not None)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    # AUROR's curve often lies on the no-attack one: distinct markers and dashes keep both visible
    for arm, label, style in (("attack", "no defense", "o-"), ("auror", "AUROR", "s--"), ("benign", "no attack", "^:")):
        success = [r[arm]["attack_success_rate"] for _, r in points]  # None: an untargeted attack (AD is its success)
        ax.plot([x for x, _ in points], [float("nan") if v is None else v for v in success], style, label=label,
                markersize=8 if arm == "auror" else 5, fillstyle="none" if arm == "auror" else "full")
    ax.set_xticks([x for x, _ in points], [f"{x:.0%}" for x, _ in points])
    ax.set_xlabel("malicious users")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    write_report_file(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def with_accuracy_drops(results: dict[str, dict]) -> dict[str, dict]:
    """Set the attack and auror arms' ``accuracy_drop`` against the benign arm in ``results``; return it."""
    for arm in ("attack", "auror"):
        results[arm]["accuracy_drop"] = accuracy_drop(results["benign"]["accuracy"], results[arm]["accuracy"])
    return results


def collect_results(setting: PaperSetting, root: Path) -> dict | None:
    """One setting's arms from the DVC stages' outputs under ``root``: ``benign/latest.json``
    and ``f<malicious fraction>/{attack,auror}/latest.json``; ``None`` when the pipeline has none."""
    if setting.malicious_fraction is None:
        return None
    folder = root / f"f{setting.malicious_fraction:g}"
    files = {"benign": root / "benign", "attack": folder / "attack", "auror": folder / "auror"}
    if not all((f / "latest.json").is_file() for f in files.values()):
        return None
    results = {arm: json.loads((f / "latest.json").read_text())[arm] for arm, f in files.items()}
    return with_accuracy_drops(results)  # the stages ran apart: the drop against the benign stage


def run_report(base: Config, seeds: list[int] | None, command: str, from_dir: str | Path | None = None) -> Path:
    """Run every paper setting of the configured dataset as cells of a grid (resumable; the results in
    ``<reports_dir>/<dataset>/paper/``), or with ``from_dir`` read the DVC stages' outputs there; write
    ``<reports_dir>/<dataset>.md``, ``.json`` and ``_sr.png``. Returns the Markdown path."""
    if from_dir is not None and not Path(from_dir).is_dir():
        raise ConfigError(f"--from: {from_dir} is not a folder (give the DVC stages' outputs, e.g. "
                          f"reports/pipeline/{base.data.name})")
    reports, name = Path(base.tracking.reports_dir), base.data.name
    settings = paper_settings(base)
    if from_dir is not None:  # the DVC stages ran the arms
        check_report(reports / f"{name}.json", report_config(base), "set tracking.reports_dir to write it elsewhere")
        rows = [(s, r) for s in settings if (r := collect_results(s, Path(from_dir))) is not None]
        if not rows:  # never overwrite a report with an empty one
            raise ConfigError(f"--from: no finished setting under {from_dir} (each needs benign/latest.json and "
                              f"f<fraction>/{{attack,auror}}/latest.json); nothing written")
        return write_report(rows, base, command, seeds)
    from pipeline.experiment.compare import Grid, summarise

    seeds = seeds or [base.seed]
    grid = Grid(base, {"paper": settings}, seeds, list(PAPER_ARMS),
                reports / name, reports / name)
    grid.check_report("set tracking.reports_dir to write it elsewhere")
    grid.run(None, f"report-{name}", track=True)
    table = summarise(grid.cells["paper"], grid.recorded()["paper"], seeds)
    return write_report([(s, {arm: table[arm][s.label] for arm in PAPER_ARMS}) for s in settings], base, command, seeds)


def write_report(rows: list[tuple[PaperSetting, dict]], base: Config, command: str, seeds: list[int] | None) -> Path:
    """``<reports_dir>/<dataset>.md``, ``.json`` and ``_sr.png`` for the rows so far."""
    reports = Path(base.tracking.reports_dir)
    name = base.data.name
    plot = plot_sr(rows, reports / f"{name}_sr.png", f"{name}: attack success, {base.users.num_users} users")
    write_report_file(reports / f"{name}.json", json.dumps({"config": report_config(base),
                                                            "results": {s.label: r for s, r in rows}}, indent=2) + "\n")
    seeds_text = ", ".join(map(str, seeds or [base.seed]))
    return write_report_file(
        reports / f"{name}.md",
        f"# {name}: AUROR against targeted poisoning ({base.attack.source_class} -> {base.attack.target_class})\n\n"
        f"Produced by `{command}` (seeds {seeds_text}; mean over seeds; config {report_config(base)['hash']}, every "
        f"value in `{name}.json`).\n\n"
        + f"{markdown_table(rows, base.report.decimals)}\n\n"
        "SR: attack success rate; AD: accuracy drop against the benign arm; DR / FPR: AUROR's detection / "
        "false-positive rate. The paper does not say whether its SR is measured with or without the "
        "defense: both are shown.\n\n"
        f"![attack success against the malicious fraction]({plot.name})\n"
    )
