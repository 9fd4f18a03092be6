"""The paper's experiments: run each setting (three arms), write a Markdown
table beside the paper's numbers and a plot of attack success against the
malicious fraction, with and without AUROR."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.experiment.config import Config, ConfigError, load_config  # noqa: E402

# The paper's Tables 5 (MNIST, by malicious users) and 6 (GTSRB, by malicious data).
PAPER = {
    ("mnist", "users", 0.2): {"DR": 1.00, "SR": 0.38, "AD": 0.02},
    ("mnist", "users", 0.3): {"DR": 1.00, "SR": 0.69, "AD": 0.05},
    ("gtsrb", "data", 0.5): {"DR": 1.00, "SR": 0.16, "AD": 0.02},
    ("gtsrb", "data", 0.7): {"DR": 0.90, "SR": 0.22, "AD": 0.04},
    ("gtsrb", "data", 0.9): {"DR": 1.00, "SR": 0.32, "AD": 0.05},
    ("gtsrb", "data", 1.0): {"DR": 0.70, "SR": 0.13, "AD": 0.02},
}


@dataclass
class Setting:
    label: str
    overrides: list[str] = field(default_factory=list)
    paper: dict | None = None
    malicious_fraction: float | None = None  # x of the plot, for the plain IID FedAvg rows

    @property
    def slug(self) -> str:
        """The label as a folder name: ``30% users, DSSGD theta_u = 0.1`` -> ``30-users-dssgd-theta_u-0.1``."""
        return re.sub(r"[^a-z0-9_.]+", "-", self.label.lower()).strip("-")


def paper_settings(cfg: Config) -> list[Setting]:
    """Malicious users 30/20/10%; for GTSRB the poisoned fractions of Table 6;
    for MNIST DSSGD (theta_u = 0.1) and non-IID (Dirichlet 0.5) at 30%.
    The settings at 30% come first: a long report shows its rows as they come."""
    name = cfg.data.name
    settings = [
        Setting(f"{f:.0%} malicious users", [f"users.malicious_fraction={f}"],
                PAPER.get((name, "users", f)), malicious_fraction=f)
        for f in ((0.2, 0.1) if name == "gtsrb" else (0.3, 0.2, 0.1))
    ]
    if name == "gtsrb":  # Table 6 first; its 100% row is also the 30%-users point of the plot
        settings[:0] = [
            Setting(f"30% users, {p:.0%} of their source samples poisoned",
                    ["users.malicious_fraction=0.3", f"attack.poisoned_fraction={p}"], PAPER[(name, "data", p)],
                    malicious_fraction=0.3 if p == 1.0 else None)
            for p in (0.5, 0.7, 0.9, 1.0)
        ]
    if name == "mnist":  # after the 30% row: the must-show settings come first
        settings[1:1] = [
            Setting("30% users, DSSGD theta_u = 0.1", ["users.malicious_fraction=0.3", "protocol.theta_u=0.1"],
                    PAPER[(name, "users", 0.3)]),
            Setting("30% users, non-IID Dirichlet(0.5)",
                    ["users.malicious_fraction=0.3", "users.partition=dirichlet", "users.dirichlet_alpha=0.5"]),
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


def markdown_table(rows: list[tuple[Setting, dict]], decimals: int = 3) -> str:
    """One row per setting: our metrics, then the paper's DR / SR / AD."""
    head = ["setting", *(c[0] for c in COLUMNS), "paper DR", "paper SR", "paper AD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, results in rows:
        ours = [_cell(results[arm][metric], decimals) for _, arm, metric in COLUMNS]
        paper = [_cell((setting.paper or {}).get(k), decimals) for k in ("DR", "SR", "AD")]
        lines.append("| " + " | ".join([setting.label, *ours, *paper]) + " |")
    return "\n".join(lines)


def plot_sr(rows: list[tuple[Setting, dict]], path: Path, title: str) -> Path:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def benign_key(cfg: Config) -> str:
    """What the benign arm depends on: everything but the attack and who attacks
    (the split and the malicious users are drawn from separate generators)."""
    knobs = cfg.to_dict()
    for section in ("attack", "tracking", "report"):  # where a setting's runs write does not change them
        knobs.pop(section)
    knobs["users"].pop("malicious_fraction")
    return json.dumps(knobs, sort_keys=True)


def with_accuracy_drops(results: dict[str, dict]) -> dict[str, dict]:
    """Set the attack and auror arms' ``accuracy_drop`` against the benign arm in ``results``; return it."""
    for arm in ("attack", "auror"):
        results[arm]["accuracy_drop"] = results["benign"]["accuracy"] - results[arm]["accuracy"]
    return results


def collect_results(setting: Setting, root: Path) -> dict | None:
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


def run_report(params: str | None, overrides: list[str], seeds: list[int] | None, command: str,
               from_dir: str | Path | None = None) -> Path:
    """Run every paper setting of the configured dataset (or, with ``from_dir``, read
    the DVC stages' outputs there); write ``<reports_dir>/<dataset>.md``, ``.json``
    and ``_sr.png``, and each setting's own run outputs (``latest.json``, ``rounds.csv``,
    plots) under ``<reports_dir>/<dataset>/<setting>/``. Returns the Markdown path."""
    from pipeline.experiment.run import run_experiment

    base = load_config(params, overrides)
    if from_dir is not None and not Path(from_dir).is_dir():
        raise ConfigError(f"--from: {from_dir} is not a folder (give the DVC stages' outputs, e.g. "
                          f"reports/pipeline/{base.data.name})")
    settings = paper_settings(base)
    # validate all first; each setting's runs write their latest.json, rounds.csv and plots in a folder of their own
    configs = [load_config(params, [*overrides, *s.overrides,
                                    f"tracking.reports_dir={Path(base.tracking.reports_dir) / base.data.name / s.slug}"])
               for s in settings]
    benign: dict[str, dict] = {}  # settings that differ only in the attack share one benign arm
    rows = []
    for setting, cfg in zip(settings, configs):
        if from_dir is not None:  # the DVC stages ran the arms
            results = collect_results(setting, Path(from_dir))
            rows += [(setting, results)] if results else []
            continue
        print(f"== {base.data.name}: {setting.label}", flush=True)
        key = benign_key(cfg)
        if key not in benign:
            benign[key] = run_experiment(cfg, seeds, arms=("benign",))["benign"]
        results = with_accuracy_drops({"benign": benign[key], **run_experiment(cfg, seeds, arms=("attack", "auror"))})
        rows.append((setting, results))
        if from_dir is None and len(rows) < len(settings):  # a long report shows its rows as they come
            write_report(rows, base, command, seeds, f"In progress: {len(rows)} of {len(settings)} settings done.")
    if not rows:  # never overwrite a report with an empty one
        raise ConfigError(f"--from: no finished setting under {from_dir} (each needs benign/latest.json and "
                          f"f<fraction>/{{attack,auror}}/latest.json); nothing written")
    return write_report(rows, base, command, seeds)


def write_report(rows: list[tuple[Setting, dict]], base: Config, command: str, seeds: list[int] | None,
                 status: str = "") -> Path:
    """``<reports_dir>/<dataset>.md``, ``.json`` and ``_sr.png`` for the rows so far."""
    reports = Path(base.tracking.reports_dir)
    name = base.data.name
    plot = plot_sr(rows, reports / f"{name}_sr.png", f"{name}: attack success, {base.users.num_users} users")
    (reports / f"{name}.json").write_text(json.dumps({s.label: r for s, r in rows}, indent=2) + "\n")
    seeds_text = ", ".join(map(str, seeds or [base.seed]))
    md = reports / f"{name}.md"
    md.write_text(
        f"# {name}: AUROR against targeted poisoning ({base.attack.source_class} -> {base.attack.target_class})\n\n"
        f"Produced by `{command}` (seeds {seeds_text}; mean over seeds).\n\n"
        + (f"**{status}**\n\n" if status else "")
        + f"{markdown_table(rows, base.report.decimals)}\n\n"
        "SR: attack success rate; AD: accuracy drop against the benign arm; DR / FPR: AUROR's detection / "
        "false-positive rate. The paper does not say whether its SR is measured with or without the "
        "defense: both are shown.\n\n"
        f"![attack success against the malicious fraction]({plot.name})\n"
    )
    return md
