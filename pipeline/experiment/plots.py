"""PNG plots of per-round metrics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.experiment.store import write_report_file  # noqa: E402


def plot_rounds(histories: dict[str, list[dict]], path: str | Path, title: str = "",
                detection_rounds: dict[str, int | None] | None = None) -> Path:
    """Accuracy and attack success rate per round, one line per arm; a dotted
    vertical line marks the round a defense flagged users."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for arm, history in histories.items():
        evaluated = [h for h in history if h["accuracy"] is not None]  # training.eval_every skips rounds
        rounds = [h["round"] for h in evaluated]
        for ax, key in zip(axes, ("accuracy", "attack_success_rate")):
            values = [float("nan") if h[key] is None else h[key] for h in evaluated]  # untargeted attacks: no SR
            (line,) = ax.plot(rounds, values, label=arm, marker=".")
            detected = (detection_rounds or {}).get(arm)
            if detected:
                ax.axvline(detected, color=line.get_color(), linestyle=":", linewidth=1)
    for ax, label in zip(axes, ("test accuracy", "attack success rate")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = write_report_file(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
