"""The Python API: the stable way into auror from notebooks and scripts.

The command line (``auror run``, ``auror defenses``, ...) and this module share
the same code underneath: [`load_config`][pipeline.api.load_config] is what ``--params`` and
``--set`` go through, [`run`][pipeline.api.run] is what ``auror run`` runs (same arms, same
seeds, same numbers, same ``<reports_dir>/latest.json``), and [`detect`][pipeline.api.detect]
is the detector the ``auror`` defense runs on the server. What this module
exports (``__all__``) keeps its names and signatures; the modules below it
(``pipeline.experiment``, ``pipeline.defenses``, ...) may change.

Every bad input is refused before any work with a
[`ConfigError`][pipeline.api.ConfigError] (a ``ValueError``) whose message is
one line naming the key, the same line ``auror`` prints after
``auror: error:``.

Examples
--------
>>> from pipeline import api
>>> cfg = api.load_config(None, ["training.rounds=3"])
>>> cfg.data.name, cfg.training.rounds
('digits', 3)
>>> "auror" in api.defenses() and "label_flip" in api.attacks()
True
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.attacks import REGISTRY as _ATTACKS
from pipeline.core.errors import ConfigError
from pipeline.core.metrics import accuracy_drop as _accuracy_drop
from pipeline.defenses import REGISTRY as _DEFENSES
from pipeline.defenses.auror import Auror as _Auror
from pipeline.defenses.auror import AurorParams as _AurorParams
from pipeline.defenses.base import check_finite_fields as _check_finite_fields
from pipeline.experiment import arms as _arms
from pipeline.experiment import config as _config
from pipeline.experiment.config import Config

__all__ = [
    "ArmRun",
    "Config",
    "ConfigError",
    "DEFAULT_ARMS",
    "Detection",
    "METRICS",
    "attacks",
    "defenses",
    "detect",
    "load_config",
    "run",
    "run_arm",
]

DEFAULT_ARMS: tuple[str, ...] = _arms.DEFAULT_ARMS
"""The arms [`run`][pipeline.api.run] runs when given none, as ``auror run`` does: benign, attack, auror."""

METRICS: tuple[str, ...] = _arms.METRICS
"""The final metrics of every arm, in this order: accuracy, attack_success_rate, accuracy_drop,
detection_rate, false_positive_rate."""


def load_config(params: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read and validate an experiment configuration.

    The built-in defaults (the dataclasses that ``params.yaml`` mirrors), then
    the YAML file ``params`` (when given), then each ``section.key=value`` of
    ``overrides`` in order, exactly as ``auror run --params PARAMS --set KEY=VALUE``
    reads them. Unlike the command line, ``params=None`` does not look for
    ``./params.yaml``: it means the built-in defaults (the same values).

    Parameters
    ----------
    params : str or pathlib.Path or None, optional
        A params YAML file (e.g. ``"configs/digits.yaml"``); keys it does not
        give keep their defaults. ``None`` (default): the built-in defaults.
    overrides : sequence of str, optional
        ``"section.key=value"`` strings, e.g. ``["training.rounds=3",
        "defense.auror.tau=0.6"]``; the value is read as YAML and converted to
        the key's type (a list: ``training.hidden_sizes=[16]``).

    Returns
    -------
    Config
        The validated configuration (a dataclass: ``cfg.training.rounds``,
        ``cfg.defense.auror.tau``, ``cfg.to_dict()``).

    Raises
    ------
    ConfigError
        A missing, unreadable or invalid params file, an unknown key, a value
        of the wrong type or out of range; the message is the line ``auror``
        prints after ``auror: error:``.
    TypeError
        ``overrides`` is a single string or holds something other than strings.

    Examples
    --------
    >>> cfg = load_config(None, ["training.rounds=3", "users.malicious_fraction=0.2"])
    >>> cfg.training.rounds, cfg.users.malicious_fraction
    (3, 0.2)
    >>> load_config(None, ["training.rounds=0"])
    Traceback (most recent call last):
    ...
    pipeline.core.errors.ConfigError: training.rounds: must be >= 1, got 0
    """
    return _config.load_config(params, _strings("overrides", overrides))


def _strings(name: str, values: Sequence[str]) -> list[str]:
    """``values`` as a list of strings; a single string (easily passed for a list of one) is refused."""
    if not isinstance(values, (str, bytes)):
        values = list(values)
        if all(isinstance(v, str) for v in values):
            return values
    raise TypeError(f"{name}: expected a list of strings, got {values!r}")


def _checked(cfg: Config) -> Config:
    """``cfg`` validated again (a copy: a notebook may have edited its fields since it was loaded)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg: expected a Config (from pipeline.api.load_config), got {type(cfg).__name__}")
    return _config.with_overrides(cfg, ())


def run(cfg: Config, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
        track: bool = False) -> dict[str, dict[str, float | None]]:
    """Run the arms of an experiment for each seed; return the final metrics, averaged over the seeds.

    What ``auror run --seeds ... --arms ...`` runs, with the same numbers
    (`pipeline.experiment.run.run_experiment` underneath). Every arm
    trains from scratch on the same data split and initial model; the
    config, the arms, the output folders and the data are checked before
    the first arm trains.

    Files written (``reports`` is ``cfg.tracking.reports_dir``, created when missing):

    - ``reports/latest.json``: the returned dictionary;
    - ``reports/rounds.csv``: one row per seed, arm and round (accuracy,
      attack success rate, users left out);
    - ``reports/latest.png``: the per-round accuracy and attack success of
      every arm (of the last seed).

    With ``track=True``, also what ``auror run`` records: one MLflow run per
    arm and seed in ``cfg.tracking.tracking_uri`` (MLflow's tracking URI is
    set process-wide) with its artifacts (``reports/plots/<arm>.png``,
    ``detection.json``, ``config.json``, the defense arms' final model) under
    ``cfg.tracking.artifact_dir``, and per-round checkpoints under
    ``checkpoints/`` beside ``artifact_dir``: an interrupted call raises
    ``pipeline.experiment.resume.RunInterrupted`` naming the id that
    ``auror run --resume ID`` continues. With ``track=False`` (default)
    nothing goes to MLflow and nothing is checkpointed.

    Parameters
    ----------
    cfg : Config
        From [`load_config`][pipeline.api.load_config] (validated again here).
    arms : sequence of str or None, optional
        ``"benign"`` (no attack, no defense), ``"attack"`` (the attack
        ``cfg.attack.name``, no defense) and any registered defense
        ([`defenses`][pipeline.api.defenses], except ``"none"``) against the same attack.
        ``None`` (default): [`DEFAULT_ARMS`][pipeline.api.DEFAULT_ARMS], ``benign``, ``attack``, ``auror``.
    seeds : sequence of int or None, optional
        Run every arm for each seed and average; ``None`` (default): ``cfg.seed``.
    track : bool, optional
        Log to MLflow and checkpoint, as ``auror run`` does (default ``False``).

    Returns
    -------
    dict of str to dict of str to float or None
        ``{arm: {metric: value}}``, arms in run order (benign first), metrics
        [`METRICS`][pipeline.api.METRICS]: ``accuracy``, ``attack_success_rate`` (``None`` for
        an untargeted attack), ``accuracy_drop`` (benign accuracy minus the
        arm's; ``None`` without the benign arm), ``detection_rate`` and
        ``false_positive_rate`` (``None`` for arms without a detecting defense).

    Raises
    ------
    ConfigError
        A bad config, an unknown arm, a defense the config cannot run (e.g.
        ``defense.auror.window_rounds`` above ``training.rounds``), a bad seed
        or an output folder that cannot be written; before any work.
    DatasetMissingError
        MNIST or GTSRB is neither on disk nor downloadable.
    TypeError
        ``cfg`` is not a [`Config`][pipeline.api.Config], or ``arms`` is a single string.

    Examples
    --------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> cfg = load_config(None, ["training.rounds=2", "defense.auror.window_rounds=2",
    ...                          f"tracking.reports_dir={out}/reports"])
    >>> results = run(cfg)
    >>> list(results)
    ['benign', 'attack', 'auror']
    >>> list(results["auror"]) == list(METRICS)
    True
    >>> import json; json.load(open(f"{out}/reports/latest.json")) == results
    True
    """
    from pipeline.experiment.run import run_experiment  # MLflow's import: only where an experiment runs

    cfg = _checked(cfg)
    arms = list(DEFAULT_ARMS) if arms is None else _strings("arms", arms)
    if not arms:
        raise ConfigError(f"arms: give at least one arm (None: {', '.join(DEFAULT_ARMS)}), got []")
    _arms.check_arms(cfg, arms)
    if seeds is not None:
        seeds = list(seeds)
        if not seeds:
            raise ConfigError(f"seeds: give at least one seed (None: the config's seed {cfg.seed}), got []")
        for seed in seeds:
            if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
                raise ConfigError(f"seeds: expected integers, got {seed!r}")
            if not 0 <= seed <= _config.MAX_SEED:
                raise ConfigError(f"seeds: must be in [0, {_config.MAX_SEED}], got {seed}")
        seeds = [int(s) for s in seeds]
    _config.check_output_folders(cfg)
    return run_experiment(cfg, seeds, track=bool(track), arms=arms)


@dataclass(frozen=True)
class ArmRun:
    """One arm trained for one seed ([`run_arm`][pipeline.api.run_arm]).

    Attributes
    ----------
    arm : str
        The arm's name.
    seed : int
        The seed it ran with (``cfg.seed``).
    metrics : dict of str to float or None
        The final model's [`METRICS`][pipeline.api.METRICS]. ``accuracy_drop`` needs the benign
        arm's accuracy: it is ``0.0`` for the benign arm itself and ``None``
        for every other arm ([`run`][pipeline.api.run] with ``benign`` among the arms
        computes it).
    history : list of dict
        One dict per round: ``round``, ``accuracy``, ``attack_success_rate``,
        and the users left out that round (``excluded_users``, ``faulty_users``,
        ``dropped_users``, ``incomplete_users``).
    detection : dict
        What the arm's defense reports: ``defense``, ``flags`` (``"run"``,
        ``"round"`` or ``"never"``), ``malicious_users`` (the ground truth) and
        the defense's own report; for ``auror``: ``detection_round``,
        ``flagged_users``, ``scores`` (per user id), ``threshold``,
        ``num_features``, ``num_indicative_features``.
    model : torch.nn.Module
        The final global model, on the CPU.
    """

    arm: str
    seed: int
    metrics: dict[str, float | None]
    history: list[dict[str, float]]
    detection: dict[str, Any]
    model: torch.nn.Module


def run_arm(cfg: Config, arm: str) -> ArmRun:
    """Train one arm for one seed (``cfg.seed``) and evaluate it; nothing is written, nothing tracked.

    The same training as that arm in [`run`][pipeline.api.run] (the same metrics for the
    same config), through `pipeline.experiment.arms.run_arm`.

    Parameters
    ----------
    cfg : Config
        From [`load_config`][pipeline.api.load_config] (validated again here).
    arm : str
        ``"benign"``, ``"attack"`` or a registered defense ([`defenses`][pipeline.api.defenses]).

    Returns
    -------
    ArmRun
        Its final metrics, per-round history, detection report and final model.

    Raises
    ------
    ConfigError
        A bad config, an unknown arm or a defense the config cannot run,
        before any data is built or any model trained.
    DatasetMissingError
        MNIST or GTSRB is neither on disk nor downloadable.
    TypeError
        ``cfg`` is not a [`Config`][pipeline.api.Config] or ``arm`` not a string.

    Examples
    --------
    >>> cfg = load_config(None, ["training.rounds=2", "defense.auror.window_rounds=2"])
    >>> result = run_arm(cfg, "auror")
    >>> result.detection["detection_round"], len(result.history), result.metrics["accuracy_drop"]
    (2, 2, None)
    >>> run_arm(cfg, "krumm")
    Traceback (most recent call last):
    ...
    pipeline.core.errors.ConfigError: --arms: must be benign, attack or a registered defense (...), got 'krumm'
    """
    cfg = _checked(cfg)
    if not isinstance(arm, str):
        raise TypeError(f"arm: expected a string, got {arm!r}")
    _arms.check_arms(cfg, [arm])
    result = _arms.run_arm(cfg, arm)
    metrics = dict(result.metrics)
    metrics["accuracy_drop"] = _accuracy_drop(metrics["accuracy"] if arm == "benign" else None, metrics["accuracy"])
    return ArmRun(arm, cfg.seed, {m: metrics.get(m) for m in METRICS}, result.history, result.detection,
                  result.module)


@dataclass(frozen=True, eq=False)
class Detection:
    """What AUROR's detector found in one update matrix ([`detect`][pipeline.api.detect]); the arrays are read-only.

    Attributes
    ----------
    flagged : tuple of int
        The flagged users: row indices of the matrix, ascending.
    scores : numpy.ndarray
        ``(users,)``: each user's fraction of the indicative features (among
        those it uploaded) where it is in the smaller cluster; flagged when
        above ``tau``.
    threshold : float
        The centre distance above which a feature is indicative (``alpha``
        itself, or its quantile with ``alpha_mode="quantile"``).
    num_features : int
        Features (columns) of the matrix.
    num_indicative_features : int
        Features whose two cluster centres are further apart than ``threshold``.
    indicative : numpy.ndarray
        ``(features,)`` bool: which features are indicative.
    centre_distance : numpy.ndarray
        ``(features,)``: the distance between each feature's two centres
        (0 where fewer than two users uploaded it; NaN where it was not
        clustered: with ``alpha_mode="absolute"``, a feature whose values span
        at most ``alpha`` cannot be indicative, and is skipped).
    """

    flagged: tuple[int, ...]
    scores: np.ndarray
    threshold: float
    num_features: int
    num_indicative_features: int
    indicative: np.ndarray
    centre_distance: np.ndarray


def detect(updates, alpha: float = 0.02, tau: float = 0.5, alpha_mode: str = "absolute") -> Detection:
    """Run AUROR's detector on an update matrix.

    The paper's detection (Shen, Tople & Saxena, ACSAC 2016), as the
    ``auror`` defense runs it at the end of its window: every feature
    (column) is clustered over the users with an exact 1-D 2-means; a feature
    is indicative when its two centres are more than a threshold apart; a
    user in the smaller cluster of more than ``tau`` of the indicative
    features it uploaded is flagged. The defaults are those of the config
    section ``defense.auror``.

    Parameters
    ----------
    updates : numpy.ndarray or torch.Tensor
        ``(users, features)``, e.g. each user's parameter update. NaN marks a
        value the user did not upload: it is left out of that feature's
        clustering and of the user's score. Read as ``float32`` (like the
        server's updates); a CUDA tensor is clustered on its device.
    alpha : float, optional
        The indicative-feature threshold (default 0.02): with
        ``alpha_mode="absolute"`` a centre distance (a finite number >= 0);
        with ``"quantile"`` the quantile of the observed centre distances, in [0, 1).
    tau : float, optional
        The fraction of indicative features in the minority above which a user
        is flagged, in [0, 1) (default 0.5).
    alpha_mode : {"absolute", "quantile"}, optional
        How ``alpha`` is read (default ``"absolute"``).

    Returns
    -------
    Detection
        The flagged users, every user's score and the indicative features.

    Raises
    ------
    ConfigError
        ``alpha``, ``tau`` or ``alpha_mode`` out of range or not a number
        (the message names ``detect.<argument>``).
    ValueError
        ``updates`` is not a numeric 2-D matrix of at least 2 users, or holds
        an infinite value (mark missing or faulty values as NaN).

    Examples
    --------
    >>> import numpy as np
    >>> updates = np.zeros((6, 4))
    >>> updates[0] = 1.0  # user 0 moved every feature, the others none
    >>> found = detect(updates, alpha=0.5, tau=0.5)
    >>> found.flagged, found.scores.tolist(), found.num_indicative_features
    ((0,), [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 4)
    >>> detect(updates, tau=1.0)
    Traceback (most recent call last):
    ...
    pipeline.core.errors.ConfigError: detect.tau: must be in [0, 1), got 1.0
    """
    for name, value in (("alpha", alpha), ("tau", tau)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ConfigError(f"detect.{name}: expected a number, got {value!r}")
    params = _AurorParams(alpha_mode=alpha_mode, alpha=float(alpha), tau=float(tau))
    params.validate("detect")
    _check_finite_fields(params, "detect")
    if isinstance(updates, torch.Tensor):
        updates = updates.detach()  # a tensor that requires grad cannot become numpy
    try:
        values = torch.as_tensor(updates, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"updates: expected a numeric (users, features) array or tensor, "
                         f"got {type(updates).__name__} ({err})") from None
    found = _Auror(params.alpha, params.tau, params.alpha_mode).fit(values)
    arrays = [np.asarray(a) for a in (found.scores_, found.indicative_, found.centre_distance_)]
    for a in arrays:
        a.setflags(write=False)
    scores, indicative, distance = arrays
    return Detection(tuple(int(i) for i in found.flagged_.nonzero()[0]), scores, float(found.threshold_),
                     int(indicative.size), int(indicative.sum()), indicative, distance)


def defenses() -> dict[str, str]:
    """The registered defenses and their one-line summaries, as ``auror defenses`` lists them.

    Every defense but ``none`` (the attack arm's plain mean) is an arm of
    [`run`][pipeline.api.run] and [`run_arm`][pipeline.api.run_arm]; its parameters are the config section
    ``defense.<name>``.

    Returns
    -------
    dict of str to str
        ``{name: summary}``, by name.

    Examples
    --------
    >>> names = defenses()
    >>> "auror" in names and "krum" in names
    True
    """
    return {name: cls.summary for name, cls in _DEFENSES.items()}


def attacks() -> dict[str, str]:
    """The registered attacks and their one-line summaries, as ``auror attacks`` lists them.

    Choose one with the override ``attack.name=<name>``; its parameters are
    the config section ``attack.<name>``.

    Returns
    -------
    dict of str to str
        ``{name: summary}``, by name.

    Examples
    --------
    >>> "label_flip" in attacks()
    True
    """
    return {name: cls.summary for name, cls in _ATTACKS.items()}
