"""What a finished study leaves: its plots on the MLflow parent run, the best trial as a params file,
and every trial as a CSV with a slice plot."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from pipeline.experiment.arms import METRICS  # noqa: E402
from pipeline.experiment.config import Config, with_overrides  # noqa: E402
from pipeline.experiment.store import write_csv, write_report_file  # noqa: E402
from pipeline.experiment.studies import FINISHED  # noqa: E402

log = logging.getLogger("auror")


def log_study_plots(study: optuna.Study) -> None:
    """Optimisation history and parameter importances as PNG artifacts of the active (parent) run."""
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = {"optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history}
    if completed >= 2:
        plots["param_importances.png"] = optuna.visualization.matplotlib.plot_param_importances
    else:
        log.info("parameter importances need 2 completed trials (have %d): not plotted", completed)
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message="Some regimes")  # few trials per alpha mode: expected
                # every trial at the same value (an attack that no knob moves past the defense): equal importances
                warnings.filterwarnings("ignore", message="Target and region quantiles select the same set")
                ax = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances over a search space with no common parameter
            log.info("%s not plotted: %s", name, err)
            continue
        fig = ax.figure
        fig.tight_layout()
        mlflow.log_figure(fig, name)
        plt.close(fig)


def write_best_params(study: optuna.Study, base: Config, kind: str, name: str) -> Path | None:
    """The best trial's full config as a params file for ``auror run --params``."""
    try:
        best = study.best_trial
    except ValueError:
        log.info("study %s has no completed trial: no best-params file", name)
        return None
    cfg = with_overrides(base, best.user_attrs["overrides"])
    metrics = best.user_attrs.get("metrics", {})
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)
    path = Path(base.tracking.reports_dir) / f"best_{name}.yaml"
    write_report_file(
        path,
        f"# Best trial {best.number} of the Optuna study {name} ({kind}): objective {best.value:.4f}\n"
        f"# auror arm: {shown}\n"
        f"# Run it: auror run --params {path}\n"
        + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    )
    return path


def setting_of(trial: optuna.trial.FrozenTrial) -> str:
    """``configured`` (the first trial), ``searched``, or ``searched: trial N's config`` (not run again)."""
    if trial.user_attrs.get("baseline"):
        return "configured"
    same = trial.user_attrs.get("same_as")
    return "searched" if same is None else f"searched: trial {same}'s config"


def write_trials(study: optuna.Study, name: str, reports_dir: str) -> Path:
    """Every finished trial of the study as ``<reports_dir>/trials_<name>.csv``: number, state, objective,
    whether it ran the configured setting (the first trial, no parameter searched) or searched ones, the
    searched parameters and the arm's metrics (empty for a pruned trial's); and ``trials_<name>.png``:
    the objective against each searched parameter (pruned trials hollow, at their last reported value)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    rows = [{"trial": t.number, "state": t.state.name, "objective": t.value,
             "setting": setting_of(t), **t.params,
             **{m: t.user_attrs.get("metrics", {}).get(m) for m in METRICS}} for t in trials]
    path = write_csv(rows, Path(reports_dir) / f"trials_{name}.csv",
                     ["trial", "state", "objective", "setting", *params, *METRICS])
    if params:  # a study of its first trial only searched nothing yet
        plot_trials(trials, params, path.with_suffix(".png"), name)
    return path


def plot_trials(trials: list, params: list[str], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, len(params), figsize=(2.6 * len(params), 2.8), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], params):
        for state in (TrialState.COMPLETE, TrialState.PRUNED):
            chosen = [t for t in trials if t.state == state and key in t.params and t.value is not None]
            ax.scatter([t.params[key] for t in chosen], [t.value for t in chosen], s=18,
                       facecolors="tab:blue" if state == TrialState.COMPLETE else "none", edgecolors="tab:blue",
                       label=state.name.lower())
        ax.set_xlabel(key.split(".")[-1], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("objective")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: {len(trials)} trials", fontsize=9)
    fig.tight_layout()
    write_report_file(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
