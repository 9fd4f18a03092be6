"""Why a detector catches or misses whom (``auror diagnose``): run the benign and
attack arms and some defenses on one setting and seeds, and lay out, per user,
what the attack gave it to work with and how each detector scored it.

An attacker is *effective* when the attack changed at least one of its
training samples (label flipping: it holds source-class samples to relabel);
for an attack without a data side (IPM, ALIE, ...) every attacker is.
Under a Dirichlet split some attackers hold no source-class sample: they
cannot poison source -> target, so a detector that misses them is not missing
an attack. ``DR eff`` is the detection rate over the effective attackers only.

Writes ``<reports_dir>/diagnose_<name>.md`` (per defense, mean over seeds:
accuracy, drop against the benign arm, SR, DR, DR eff, FPR; per seed, each
attacker's changed samples), ``.json`` (every user's score under every
defense that scores users) and ``.png`` (score against source-class samples,
per defense: who sits where against the threshold).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from pipeline.attacks.base import Attack
from pipeline.core.metrics import accuracy_drop, defense_detection_rates
from pipeline.experiment.arms import DataCache, check_arms, check_defenses, make_attack, poison_users, run_arm
from pipeline.experiment.config import Config, ConfigError
from pipeline.experiment.store import check_report, report_config, write_report_file
from pipeline.lazy import OnFirstUse, torch

plots = OnFirstUse("pipeline.experiment.plots")  # matplotlib (Agg) when the figure is drawn

# where each detector's threshold lies on its score (the dashed line of the figure)
THRESHOLDS = {"auror": lambda p: p.tau, "auror_noniid": lambda p: -p.margin}
SCORE_NAMES = {"auror": "fraction of indicative features in the minority",
               "auror_noniid": "mean alignment on the suspect class"}


def effective_attackers(malicious: torch.Tensor, user_indices: list, poisoned: torch.Tensor,
                        poisons_data: bool) -> torch.Tensor:
    """Bool (users,): malicious users with at least one sample the attack changed (every
    malicious user when the attack has no data side)."""
    if not poisons_data:
        return malicious.clone()
    changed = torch.tensor([bool(poisoned[idx].any()) for idx in user_indices])
    return malicious & changed


def poisons_data(attack: Attack) -> bool:
    """The attack changes the malicious users' data (it overrides :meth:`Attack.poison_data`)."""
    return type(attack).poison_data is not Attack.poison_data


def run_diagnosis(base: Config, overrides: list[str], seeds: list[int], defenses: list[str], name: str) -> Path:
    """Run benign, attack and ``defenses`` for each seed; write ``diagnose_<name>.*`` (``overrides``: the
    ``--set`` values the report names as its setting). Everything is checked before the first arm runs."""
    check_defenses("--defenses", base, defenses)
    arms = check_arms(base, ["benign", "attack", *defenses])
    reports = Path(base.tracking.reports_dir)
    config = report_config(base)
    check_report(reports / f"diagnose_{name}.json", config, "give another --name")
    out: dict = {"config": config, "setting": overrides, "seeds": {}}
    for seed in seeds:
        cfg = dataclasses.replace(base, seed=seed)
        attack = make_attack(cfg)
        cache = DataCache()
        data = copy.copy(cache.get(cfg, "attack"))
        attack.setup(data.train_x)
        poison_users(data, attack)
        source = cfg.attack.source_class
        source_counts = [int((data.clean_train_y[idx] == source).sum()) for idx in data.user_indices]
        changed = [int(data.poisoned[idx].sum()) for idx in data.user_indices]
        effective = effective_attackers(data.malicious, data.user_indices, data.poisoned, poisons_data(attack))
        seed_out = {"malicious": data.malicious.nonzero().flatten().tolist(),
                    "effective": effective.nonzero().flatten().tolist(),
                    "source_samples": source_counts, "changed_samples": changed, "arms": {}}
        benign_accuracy = None
        for arm in arms:
            print(f"== diagnose {name}: seed {seed}, arm {arm}", flush=True)
            result = run_arm(cfg, arm, data=cache)
            row = {k: result.metrics.get(k) for k in ("accuracy", "attack_success_rate",
                                                      "detection_rate", "false_positive_rate")}
            benign_accuracy = row["accuracy"] if arm == "benign" else benign_accuracy
            row["accuracy_drop"] = accuracy_drop(benign_accuracy, row["accuracy"])
            if arm in defenses:
                det = result.detection
                dr_eff, _ = defense_detection_rates(det["flags"], set(det.get("flagged_users", [])),
                                                    det.get("excluded_per_round", []), effective)
                row["effective_detection_rate"] = dr_eff
                row["scores"] = det.get("scores", {})
                for key in ("num_indicative_features", "num_features", "suspect_class"):
                    if key in det:
                        row[key] = det[key]
            seed_out["arms"][arm] = row
        out["seeds"][str(seed)] = seed_out
    write_report_file(reports / f"diagnose_{name}.json", json.dumps(out, indent=1) + "\n")
    setting = " ".join(o for o in overrides if not o.startswith("tracking."))  # not where it writes
    md = write_report_file(reports / f"diagnose_{name}.md",
                           diagnosis_markdown(out, [a for a in arms if a in defenses], base, setting))
    plot_scores(out, [a for a in arms if a in defenses], base, reports / f"diagnose_{name}.png")
    return md


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def diagnosis_markdown(out: dict, defenses: list[str], cfg, setting: str) -> str:
    seeds = list(out["seeds"].values())
    lines = [f"# Diagnosis: {cfg.data.name}, {setting or 'the configured setting'}, seeds {', '.join(out['seeds'])}",
             "", f"Attack {cfg.attack.name} ({cfg.attack.source_class} -> {cfg.attack.target_class}). "
             "DR eff: detection rate over the effective attackers (those with at least one sample the attack "
             "changed). AD: accuracy drop against the benign arm of the same seed.", "",
             "| arm | accuracy | AD | SR | DR | DR eff | FPR |", "|---|---|---|---|---|---|---|"]
    for arm in ["benign", "attack", *defenses]:
        rows = [s["arms"][arm] for s in seeds]
        drop = _mean(r["accuracy_drop"] for r in rows)
        lines.append(f"| {arm} | {_fmt(_mean(r['accuracy'] for r in rows))} | {_fmt(drop)} | "
                     f"{_fmt(_mean(r['attack_success_rate'] for r in rows))} | "
                     f"{_fmt(_mean(r['detection_rate'] for r in rows))} | "
                     f"{_fmt(_mean(r.get('effective_detection_rate') for r in rows))} | "
                     f"{_fmt(_mean(r['false_positive_rate'] for r in rows))} |")
    lines += ["", "Per seed: each attacker's source-class samples (changed by the attack), and whom each "
              "defense flagged (users flagged at the end of the run):", ""]
    for seed, s in out["seeds"].items():
        attackers = ", ".join(f"{u}: {s['source_samples'][u]} ({s['changed_samples'][u]})" for u in s["malicious"])
        lines.append(f"- seed {seed}: attackers {attackers}; effective {len(s['effective'])} of {len(s['malicious'])}")
        for d in defenses:
            row = s["arms"][d]
            extra = "".join(f", {k.replace('_', ' ')} {row[k]}" for k in
                            ("num_indicative_features", "num_features", "suspect_class") if k in row)
            lines.append(f"  - {d}: DR {_fmt(row['detection_rate'])}, DR eff {_fmt(row['effective_detection_rate'])}, "
                         f"FPR {_fmt(row['false_positive_rate'])}{extra}")
    return "\n".join(lines) + "\n"


def plot_scores(out: dict, defenses: list[str], cfg, path: Path) -> None:
    """Per defense that scores users: score against the user's source-class samples, honest users,
    effective and other attackers marked, the threshold dashed."""
    scored = [d for d in defenses if d in SCORE_NAMES]
    if not scored:
        return
    fig, axes = plots.plt.subplots(1, len(scored), figsize=(5.5 * len(scored), 4.2), squeeze=False)
    for ax, d in zip(axes[0], scored):
        groups = {"honest": ([], []), "effective attacker": ([], []), "attacker, nothing to poison": ([], [])}
        for s in out["seeds"].values():
            for user, score in s["arms"][d].get("scores", {}).items():
                u = int(user)
                group = ("effective attacker" if u in s["effective"] else
                         "attacker, nothing to poison" if u in s["malicious"] else "honest")
                groups[group][0].append(s["source_samples"][u] + 1)
                groups[group][1].append(score)
        for (label, (x, y)), style in zip(groups.items(), [("o", "tab:gray"), ("x", "tab:red"), ("^", "tab:orange")]):
            ax.scatter(x, y, marker=style[0], color=style[1], label=label, alpha=0.8)
        ax.axhline(THRESHOLDS[d](getattr(cfg.defense, d)), color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"source-class ({cfg.attack.source_class}) samples + 1")
        ax.set_ylabel(SCORE_NAMES[d])
        ax.set_title(d)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_report_file(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plots.plt.close(fig)
