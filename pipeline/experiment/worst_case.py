"""Each defense judged against its worst attacker (``auror worst-case``).

For every (defense, attack) pair whose attack has searchable knobs (its ``search_ranges``), an Optuna
study of ``auror tune --kind attack`` against that defense, with the attackers the setting fixes (their
number is not searched: it is the threat model, not a knob), maximises the attack's own success: SR
for a targeted attack, the accuracy drop against the benign arm for an untargeted one. Trial 0 of
each study is the attack at its configured knobs (the default-knob value); per-round reports prune
hopeless trials (:mod:`pipeline.experiment.tune`). The studies live in the Optuna storage: workers that
run the same command with the same ``--storage`` split every study's trials, and running it again
continues each study to ``--n-trials`` (a finished study runs nothing) and rewrites the report.

A search has a name (``--name``, default ``worst_case_<dataset>``); its studies are
``worst-<attack>-<defense>-<name without worst_case_>``, so another setting of the same config file
(``--set users.partition=dirichlet``) is searched under a name of its own; a study made under another
setting is refused before any trial runs.

The report, ``<reports_dir>/<name>.md/.json/.png``: per defense,
its worst targeted SR and worst accuracy drop over the attacks, the attack and knobs that reached
them, beside that attack's default-knob value; every pair's default and worst value; a heatmap.
Each study's trials are in ``<reports_dir>/worst_case/<dataset>/trials_<study>.csv``; the benign arm, whose
accuracy the accuracy drop is against, runs once for the studies of one config (recorded by its cell's key in
``<reports_dir>/worst_case/<dataset>/cells/``), not once per study.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.attacks.base import ACCURACY_DROP
from pipeline.experiment.arms import ARMS, check_defenses, make_attack
from pipeline.experiment.config import Config, ConfigError, check_name, with_overrides
from pipeline.experiment.store import check_report, report_config, write_report_file
from pipeline.experiment.storage import STUDY_STORAGE
from pipeline.experiment.tune import StudySpec, load_study, run_study, validate_spec

log = logging.getLogger("auror")


def searchable_attacks() -> list[str]:
    """The attacks with knobs to search (every registered one with ``search_ranges``)."""
    return [name for name, attack in ATTACKS.items() if attack.search_ranges]


def plan(cfg: Config, defenses: list[str] | None, attacks: list[str] | None, n_trials: int,
         storage: str | None, name: str) -> list[StudySpec]:
    """One study per (defense, attack) pair, every one validated before any runs; the studies of the search
    ``name`` are ``worst-<attack>-<defense>-<name less its worst_case_ prefix>`` (``-mnist`` by default)."""
    suffix = name.removeprefix("worst_case_")
    defenses = defenses or list(ARMS[2:])
    attacks = attacks or searchable_attacks()
    for attack in attacks:
        if attack not in ATTACKS:
            raise ConfigError(f"--attacks: must be registered attacks ({', '.join(ATTACKS)}), got {attack!r}")
        if not ATTACKS[attack].search_ranges:
            raise ConfigError(f"--attacks: {attack} has no knobs to search ({', '.join(searchable_attacks())} have)")
    check_defenses("--defenses", cfg, defenses)
    base = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, reports_dir=str(Path(cfg.tracking.reports_dir) / "worst_case" / cfg.data.name)))
    specs = []
    for attack in dict.fromkeys(attacks):
        attacked = with_overrides(base, [f"attack.name={attack}"])
        for defense in dict.fromkeys(defenses):
            spec = StudySpec(attacked, "attack", defense, n_trials, storage,
                             f"worst-{attack}-{defense.replace('+', '.')}-{suffix}", fixed_attackers=True,
                             benign_store=Path(base.tracking.reports_dir) / "cells")
            validate_spec(spec, attacked)
            specs.append(spec)
    return specs


def summarise(spec: StudySpec, study) -> dict:
    """A pair's row: its default-knob value (trial 0), its worst (the study's best) and the knobs of it
    (a study not made yet: no value, no trial)."""
    from pipeline.experiment.studies import counted, searched  # (Optuna loads only when a report is read)

    attack = spec.cfg.attack.name
    trials = [] if study is None else study.trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and counted(t)]
    baseline = next((t for t in trials if t.user_attrs.get("baseline") and t.state.name == "COMPLETE"), None)
    completed = [t for t in finished if t.state.name == "COMPLETE"]
    best = max(completed, key=lambda t: t.value) if completed else None
    return {"defense": spec.defense, "attack": attack, "study": spec.study_name,
            "metric": "AD" if make_attack(spec.cfg).success_metric == ACCURACY_DROP else "SR",  # ALIE's: by variant
            "default": None if baseline is None else baseline.value,
            "worst": None if best is None else best.value, "worst_trial": None if best is None else best.number,
            "knobs": None if best is None else best.user_attrs.get("overrides", []), "trials": len(finished),
            "done": study is not None and searched(study, spec.n_trials)}


def run_worst_case(cfg: Config, defenses: list[str] | None, attacks: list[str] | None, n_trials: int,
                   storage: str | None, name: str | None, command: str, report_only: bool = False) -> Path:
    """Run (or continue) every pair's study, writing the report after each; returns the Markdown's path.

    ``report_only``: run nothing, write the report from the studies the storage holds (refused when it
    holds none of them)."""
    if n_trials < 1:
        raise ConfigError(f"--n-trials: must be >= 1, got {n_trials}")
    name = check_name("--name", name or f"worst_case_{cfg.data.name}")
    stem = Path(cfg.tracking.reports_dir) / name
    config = report_config(cfg)
    specs = plan(cfg, defenses, attacks, n_trials, storage, name)
    check_report(stem.with_suffix(".json"), config, "give --name NAME to write this report as NAME.md beside it")
    url = storage or STUDY_STORAGE
    made = not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).is_file()
    rows = [summarise(spec, None) for spec in specs]
    if made:  # (opening a file not made yet would make an empty database)
        from pipeline.experiment.studies import open_storage  # (Optuna loads only when a report is read)

        opened = open_storage(url)  # every study it holds, read once: one of another setting is refused before any work
        rows = [summarise(spec, load_study(spec, opened, "give --name NAME to search this setting in studies of "
                                                        "their own")) for spec in specs]
    if report_only:
        if not any(r["trials"] for r in rows):
            raise ConfigError(f"--report-only: no trial of these {len(specs)} studies in {url}; "
                              "run without --report-only first")
        return write_report(rows, cfg, config, n_trials, command, stem)
    md, spent, searched = None, 0.0, 0
    for i, spec in enumerate(specs):  # the report after each study: an interrupted search leaves its progress
        if rows[i]["done"]:  # searched to the budget already (by this worker or another)
            continue
        log.info("== study %d/%d: %s against %s (%s)", i + 1, len(specs), spec.cfg.attack.name, spec.defense,
                 spec.study_name)
        start = time.monotonic()
        rows[i] = summarise(spec, run_study(spec).study)
        md = write_report(rows, cfg, config, n_trials, command, stem)
        spent, searched = spent + time.monotonic() - start, searched + 1
        left = sum(not r["done"] for r in rows[i + 1:])
        log.info("%d pairs searched in %.0f min by this worker; %d to go, about %.1f h for one worker at this pace",
                 searched, spent / 60, left, left * spent / searched / 3600)
    return md or write_report(rows, cfg, config, n_trials, command, stem)


def leaderboard(rows: list[dict]) -> list[dict]:
    """Per defense: its worst SR and worst AD over the attacks, with the attack, knobs and default value, and
    ``worst`` the larger of the two: best (lowest) first, a defense with nothing searched last."""
    board = []
    for defense in dict.fromkeys(r["defense"] for r in rows):
        entry = {"defense": defense}
        for metric in ("SR", "AD"):
            scored = [r for r in rows if r["defense"] == defense and r["metric"] == metric and r["worst"] is not None]
            top = max(scored, key=lambda r: r["worst"], default=None)
            entry[metric] = None if top is None else {k: top[k] for k in ("attack", "worst", "default", "knobs")}
        entry["worst"] = max((entry[m]["worst"] for m in ("SR", "AD") if entry[m]), default=None)
        board.append(entry)
    return sorted(board, key=lambda e: (e["worst"] is None, e["worst"] or 0.0))


def short_knob(override: str) -> str:
    """``key=value`` with a fractional value to 3 significant digits (the tables; the JSON keeps every digit)."""
    key, _, text = override.partition("=")
    try:
        number = float(text)
    except ValueError:
        return override
    return override if number.is_integer() else f"{key}={number:.3g}"


def write_report(rows: list[dict], cfg: Config, config: dict, n_trials: int, command: str, stem: Path) -> Path:
    """``<stem>.json`` (config, budget, every pair, the leaderboard), ``<stem>.md`` and the heatmap ``<stem>.png``."""
    from pipeline.experiment.studies import REPEATS_CAP  # (loaded with the studies the rows come from)

    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"config": config, "n_trials": n_trials, "pairs": rows, "leaderboard": leaderboard(rows)}
    write_report_file(stem.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    lines = [f"# {cfg.data.name}: each defense against its worst attacker", "",
             f"Produced by `{command}`: per (defense, attack) pair an Optuna study of {n_trials} trials "
             "(trial 0: the attack's configured knobs; a trial that repeats a tried setting is not counted) "
             "maximising the attack's success with the setting's "
             f"{cfg.users.malicious_fraction:.0%} malicious users; config {config['hash']}, every value in "
             f"`{stem.name}.json`. SR: attack success rate (targeted); AD: accuracy drop against the benign arm "
             "(untargeted). Each cell: worst (default knobs).", "",
             f"Searched to the budget: {sum(r['done'] for r in rows)} of {len(rows)} pairs (the "
             "pairs' table gives each pair's finished trials; a pair at 0 has not been searched yet; a pair "
             f"below {n_trials} is done when its sampler asked {REPEATS_CAP} x as many, proposing tried settings "
             "only).", ""]
    for section, table in report_tables(data).items():
        lines += [f"## {section}", "", table]
    lines += [f"![worst-case success per defense and attack]({stem.name}.png)", ""]
    write_report_file(stem.with_suffix(".md"), "\n".join(lines))
    plot_heatmap(rows, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


def report_tables(data: dict) -> dict[str, str]:
    """The report's two tables from its JSON, by section: the leaderboard and every pair (the docs site
    renders the same from the committed JSON)."""
    rows = data["pairs"]

    def value(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    def knobs(overrides: list[str] | None) -> str:
        return "configured" if not overrides else ", ".join(f"`{short_knob(o)}`" for o in overrides)

    board = ["Best first: by the larger of the defense's worst SR and worst AD.", "",
             "| defense | worst | worst SR | by (knobs) | worst AD | by (knobs) |", "|---|---|---|---|---|---|"]
    for entry in data["leaderboard"]:
        cells = [value(entry["worst"])]
        for metric in ("SR", "AD"):
            top = entry[metric]
            cells += (["-", "-"] if top is None else
                      [f"{value(top['worst'])} ({value(top['default'])})", f"{top['attack']} ({knobs(top['knobs'])})"])
        board.append(f"| {entry['defense']} | " + " | ".join(cells) + " |")
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    pairs = ["Each cell: worst (default knobs, trials finished).", "",
             "| defense | " + " | ".join(f"{a} {next(r['metric'] for r in rows if r['attack'] == a)}" for a in attacks)
             + " |", "|---|" + "---|" * len(attacks)]
    for defense in dict.fromkeys(r["defense"] for r in rows):
        by = {r["attack"]: r for r in rows if r["defense"] == defense}
        pairs.append(f"| {defense} | " + " | ".join(
            f"{value(by[a]['worst'])} ({value(by[a]['default'])}, {by[a]['trials']})" if a in by else "-"
            for a in attacks) + " |")
    return {"leaderboard": "\n".join(board) + "\n", "pairs": "\n".join(pairs) + "\n"}


def plot_heatmap(rows: list[dict], path: Path) -> Path:
    """Defenses x attacks, colour: the worst-case success, each cell written as worst / default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    grid = np.full((len(defenses), len(attacks)), np.nan)
    text = [["" for _ in attacks] for _ in defenses]
    for r in rows:
        i, j = defenses.index(r["defense"]), attacks.index(r["attack"])
        if r["worst"] is not None:
            grid[i, j] = r["worst"]
            text[i][j] = f"{r['worst']:.2f}\n({'-' if r['default'] is None else format(r['default'], '.2f')})"
    fig, ax = plt.subplots(figsize=(1.2 * len(attacks) + 3, 0.5 * len(defenses) + 2))
    image = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(attacks)), [f"{a}\n({next(r['metric'] for r in rows if r['attack'] == a)})"
                                        for a in attacks], fontsize=8)
    ax.set_yticks(range(len(defenses)), defenses, fontsize=8)
    for i in range(len(defenses)):
        for j in range(len(attacks)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="worst-case success (SR or AD)")
    ax.set_title("each defense against its worst attacker: worst (default knobs)", fontsize=9)
    fig.tight_layout()
    write_report_file(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path
