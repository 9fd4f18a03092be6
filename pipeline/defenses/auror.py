"""AUROR (Shen, Tople, Saxena, ACSAC 2016): flag the users whose masked
features sit in the minority of too many indicative features.

:class:`Auror` is the detector, a scikit-learn-shaped estimator over a
``(users, features)`` matrix of uploaded values (no data, no labels);
:class:`AurorDefense` runs it on the server: it collects every user's update
over the first ``window_rounds`` rounds, flags users at the end of the window,
and leaves the flagged users out of every aggregate from that round on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pipeline.lazy import torch

from pipeline.core.masking import aggregate_per_coordinate
from pipeline.core.server import Aggregate, Uploads, present_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number
from pipeline.defenses.clustering import two_means_1d

log = logging.getLogger("auror")


def value_range(x: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest and smallest value present (NaN: missing), (rows,) each; ``-inf, +inf`` for a row
    with none. One pass over the rows without NaN; the NaN-aware pass only over the others, ``chunk_size``
    rows at a time (its copies stay small)."""
    high, low = x.amax(1), x.amin(1)  # NaN where a value is missing
    for part in high.isnan().nonzero().squeeze(1).split(chunk_size):
        rows = x.index_select(0, part)
        high[part], low[part] = rows.nan_to_num(-math.inf).amax(1), rows.nan_to_num(math.inf).amin(1)
    return high, low


class Auror:
    """Detect poisoning users from their masked features.

    Parameters
    ----------
    alpha : float
        Indicative-feature threshold: a feature is indicative when the
        distance between its two 2-means centres exceeds the threshold.
    tau : float
        A user in the smaller cluster of more than this fraction of the
        indicative features (among those it uploaded) is flagged.
    alpha_mode : {"absolute", "quantile"}
        ``"absolute"``: the threshold is ``alpha`` itself. ``"quantile"``: the
        threshold is the ``alpha``-quantile of the observed centre distances.
    chunk_size : int
        Features clustered and scored at a time; bounds the memory beyond the input's.

    Attributes
    ----------
    centre_distance_ : ndarray (features,)  distance of the two centres (0: fewer than 2 values; NaN: not
                                            clustered, as its values span at most alpha: absolute mode only)
    threshold_ : float                      the distance threshold used
    indicative_ : ndarray of bool (features,)
    scores_ : ndarray (users,)              fraction of indicative features where the user is in the minority
    flagged_ : ndarray of bool (users,)

    Examples
    --------
    >>> import numpy as np
    >>> updates = np.zeros((6, 4)); updates[0] = 1.0   # user 0 differs on every feature
    >>> Auror(alpha=0.5, tau=0.5).fit(updates).flagged_.nonzero()[0].tolist()
    [0]
    """

    def __init__(self, alpha: float = 0.02, tau: float = 0.5, alpha_mode: str = "absolute",
                 chunk_size: int = 4096) -> None:
        self.alpha = alpha
        self.tau = tau
        self.alpha_mode = alpha_mode
        self.chunk_size = chunk_size

    def fit(self, updates) -> "Auror":
        """Cluster every feature of ``updates`` (``users x features``, NaN where
        a user did not upload a feature) across users, and flag users."""
        if self.alpha_mode not in ("absolute", "quantile"):
            raise ValueError(f"alpha_mode must be 'absolute' or 'quantile', got {self.alpha_mode!r}")
        if not 0 <= self.tau < 1:
            raise ValueError(f"tau must be in [0, 1), got {self.tau!r}")
        values = torch.as_tensor(updates, dtype=torch.float32)  # on its own device: the scoring runs there
        if values.dim() != 2 or values.shape[0] < 2:
            raise ValueError(f"updates must be (users >= 2, features), got shape {tuple(values.shape)}")
        by_feature = values.T  # (features, users), a view
        high, low = value_range(by_feature, self.chunk_size)
        if (high == math.inf).any() or (low == -math.inf).any():
            raise ValueError("updates contain Inf; mark missing or faulty values as NaN")
        if self.alpha_mode == "absolute":
            # both centres lie within a feature's range of values, so a feature spanning at most alpha cannot
            # be indicative: only the others are clustered (about a third of MNIST's parameters in a round)
            clustered = (high - low > self.alpha).nonzero().squeeze(1)
        if self.alpha_mode == "quantile" or len(clustered) == len(by_feature):
            clustered, rows = slice(None), by_feature  # every feature clustered (a quantile needs them all)
        else:
            rows = by_feature.index_select(0, clustered)  # (clustered features, users), contiguous
        clusters = two_means_1d(rows, self.chunk_size)
        distance = torch.full((len(by_feature),), math.nan, device=values.device)
        distance[clustered] = torch.nan_to_num(clusters.high - clusters.low, nan=0.0)
        if self.alpha_mode == "absolute":
            self.threshold_ = float(self.alpha)
        else:
            self.threshold_ = float(np.quantile(distance.cpu().numpy(), self.alpha))
        chosen = (distance[clustered] > self.threshold_).nonzero().squeeze(1)  # among the clustered rows

        in_minority = torch.zeros(values.shape[0], dtype=torch.int64, device=values.device)
        uploaded = torch.zeros_like(in_minority)
        for part in chosen.split(self.chunk_size):  # indicative features, a chunk at a time
            upper = clusters.upper.index_select(0, part)  # (chunk, users)
            present = ~torch.isnan(rows.index_select(0, part))
            n_upper = upper.sum(1, keepdim=True)
            n_lower = present.sum(1, keepdim=True) - n_upper
            # the smaller cluster is suspicious; on a tie neither is
            minority = torch.where(n_upper < n_lower, upper, (n_lower < n_upper) & present & ~upper)
            in_minority += minority.sum(0)
            uploaded += present.sum(0)
        self.centre_distance_ = distance.cpu().numpy()
        self.indicative_ = (distance > self.threshold_).cpu().numpy()
        self.scores_ = (in_minority.double() / uploaded.clamp(min=1).double()).cpu().numpy()
        self.flagged_ = self.scores_ > self.tau
        return self


def window_tensor(entries: list[tuple[int, torch.Tensor, torch.Tensor]],
                  device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The window's uploads as one (rounds, users, P) tensor over every user seen in it (ascending ids; NaN
    rows in a round the user was absent from, under sampling), and those ids. With the same users in every
    round, the rounds' uploads stacked as they are."""
    ids = [e[1].tolist() for e in entries]
    if all(i == ids[0] for i in ids):
        return torch.stack([u.to(device) for _, _, u in entries]), ids[0]
    seen = sorted({u for i in ids for u in i})
    row = {u: k for k, u in enumerate(seen)}
    window = torch.full((len(entries), len(seen), entries[0][2].shape[1]), torch.nan, device=device,
                        dtype=entries[0][2].dtype)
    for r, (_, users, updates) in enumerate(entries):
        window[r, [row[u] for u in users.tolist()]] = updates.to(device)
    return window, seen


def window_mean(window: torch.Tensor) -> torch.Tensor:
    """``window.nanmean(0)`` to the bit, (rounds, users, P) -> (users, P): the plain mean when no value is
    missing (the sum of all values is NaN only when one is: uploads hold no Inf), a fifth of nanmean's time."""
    if torch.isnan(window.sum()):
        return window.nanmean(0)
    return window.sum(0) / len(window)


ALPHA_MODES = ("absolute", "quantile")
WINDOW_REDUCES = ("mean", "stack")
RECOVERIES = ("none", "restart")
THRESHOLDS = ("tau", "gap")
# Optuna's search ranges; alpha's depends on how it is read: low, high, log scale
ALPHA_RANGES = {"absolute": (1e-3, 0.5, True), "quantile": (0.5, 0.999, False)}
TAU_RANGE = (0.1, 0.9)
GAP_RANGE = (0.25, 4.0)
MAX_WINDOW_ROUNDS = 10


def separated_minority(scores: np.ndarray, min_gap: float, min_ratio: float) -> np.ndarray:
    """The gap rule's split (bool (users,)). A split of the sorted scores qualifies when it leaves fewer than
    half the users above it, its gap is at least ``min_gap`` times the range of the scores below it, and the
    lowest score above it is at least ``min_ratio`` times the highest below it (both counted as at least
    ``GAP_FLOOR``); the users above the qualifying split with the widest relative gap are flagged, nobody
    when none qualifies. Scores have no level that holds across runs (under label skew honest users score
    0.06-0.71 with nobody attacking, attackers 0.01-0.76 beside honest users below 0.06: docs/auror_guard.md),
    so the rule asks for a minority that stands apart from the rest; with few users (7 honest ones left under
    label skew) a continuum of scores has wide gaps by chance, but not a 4-fold jump (3.0 seen; attackers 4.6 and more)."""
    ordered = np.sort(scores)
    flagged = np.zeros(len(scores), dtype=bool)
    if len(scores) < 3:
        return flagged
    splits = np.arange(len(scores) // 2, len(scores) - 1)  # after ordered[i]: fewer than half above
    below, above = ordered[splits], ordered[splits + 1]
    gap = (above - below) / np.maximum(below - ordered[0], GAP_FLOOR)
    qualifies = (gap >= min_gap) & (above >= min_ratio * np.maximum(below, GAP_FLOOR))
    if qualifies.any():
        flagged = scores > below[qualifies][np.argmax(gap[qualifies])]
    return flagged


GAP_FLOOR = 0.01  # a tight lower group (honest users near 0) is as wide and as high as this at least


def gap_flags(detector: "Auror", min_gap: float, min_ratio: float, min_indicative: float) -> np.ndarray:
    """The gap rule on a fitted detector: :func:`separated_minority` of its scores, when at least
    ``min_indicative`` of the features are indicative; nobody otherwise (honest IID windows have 0-2
    indicative features of 109,386 on MNIST, each user's score then 0, 0.5 or 1 by chance)."""
    if detector.indicative_.sum() < min_indicative * detector.indicative_.size:
        return np.zeros(len(detector.scores_), dtype=bool)
    return separated_minority(detector.scores_, min_gap, min_ratio)


@dataclass
class AurorParams(DefenseParams):
    # how alpha is read: "absolute" centre distance, or the "quantile" of the
    # observed centre distances over all features
    alpha_mode: str = "absolute"
    alpha: float = 0.02
    tau: float = 0.5
    window_rounds: int = 3
    # "mean": one feature per parameter, averaged over the window; "stack": one feature per (round, parameter)
    window_reduce: str = "mean"
    # the policy around the detector; these defaults are the paper's (auror_guard's differ)
    redetect_every: int = 0  # 0: decide once, at round window_rounds; N: again every N rounds after it
    recovery: str = "none"  # none | restart: on new flags, retrain from the model before the evidence window
    threshold: str = "tau"  # tau: flag scores > tau (the paper) | gap: flag a minority whose scores stand apart
    min_gap: float = 1.0  # gap rule: the gap above the others, in units of their range
    min_ratio: float = 4.0  # gap rule: the lowest flagged score over the highest unflagged one
    min_indicative: float = 0.01  # gap rule: decide only when at least this fraction of the features is indicative
    unkeyed_defaults: ClassVar[dict] = {"redetect_every": 0, "recovery": "none", "threshold": "tau", "min_gap": 1.0,
                                        "min_ratio": 4.0, "min_indicative": 0.01}

    def validate(self, key: str) -> None:
        check(self.alpha_mode in ALPHA_MODES, f"{key}.alpha_mode", f"must be one of {', '.join(ALPHA_MODES)}",
              self.alpha_mode)
        if self.alpha_mode == "quantile":
            check(0 <= self.alpha < 1, f"{key}.alpha", "must be in [0, 1) with alpha_mode=quantile", self.alpha)
        else:
            check(finite_number(self.alpha) and self.alpha >= 0, f"{key}.alpha", "must be a finite number >= 0",
                  self.alpha)
        check(0 <= self.tau < 1, f"{key}.tau", "must be in [0, 1)", self.tau)
        check(self.window_rounds >= 1, f"{key}.window_rounds", "must be >= 1", self.window_rounds)
        check(self.window_reduce in WINDOW_REDUCES, f"{key}.window_reduce",
              f"must be one of {', '.join(WINDOW_REDUCES)}", self.window_reduce)
        check(isinstance(self.redetect_every, int) and self.redetect_every >= 0, f"{key}.redetect_every",
              "must be an integer >= 0 (0: decide once)", self.redetect_every)
        check(self.recovery in RECOVERIES, f"{key}.recovery", f"must be one of {', '.join(RECOVERIES)}",
              self.recovery)
        check(self.threshold in THRESHOLDS, f"{key}.threshold", f"must be one of {', '.join(THRESHOLDS)}",
              self.threshold)
        check(finite_number(self.min_gap) and self.min_gap > 0, f"{key}.min_gap", "must be a finite number > 0",
              self.min_gap)
        check(finite_number(self.min_ratio) and self.min_ratio >= 1, f"{key}.min_ratio",
              "must be a finite number >= 1", self.min_ratio)
        check(finite_number(self.min_indicative) and 0 <= self.min_indicative < 1, f"{key}.min_indicative",
              "must be in [0, 1)", self.min_indicative)


@register
class AurorDefense(Defense):
    """AUROR as the paper describes it: every parameter of every layer is a
    feature; detection once, at the end of round ``window_rounds``, from the
    updates of rounds 1..K (``window_reduce``); the flagged users are left out
    of every later aggregate (the per-coordinate mean of the others).

    The policy around the detector (``auror_guard`` sets all three):

    - ``redetect_every = N > 0``: it decides again at rounds K + N, K + 2N, ..., each time from the
      updates of the last K rounds and among the users not flagged yet. A flag is never lifted: a user
      flagged once has shown the attack, and a flag it could shed by behaving for a window would let it
      choose when to attack again;
    - ``recovery = restart``: on a new flag at round t, the global model goes back to its state after
      round t - K (before the evidence window; round 0, the initial model, at the first window) and
      rounds t - K + 1.. are trained again without every flagged user (the paper's "train the final
      global model" without them). The loop counts the rounds trained again (``rounds_retrained``);
    - ``threshold = gap``: flag a minority whose scores stand apart from the others'
      (:func:`separated_minority`), instead of every score above ``tau``.
    """

    name = "auror"
    summary = "AUROR (Shen et al. 2016): 2-means on every parameter, flag users in the minority of > tau indicative ones"
    Params = AurorParams
    search_ranges = {"tau": TAU_RANGE + (False,), "min_gap": GAP_RANGE + (True,)}  # and alpha_mode, alpha,
    # window_rounds: search_space (tau or min_gap, by the threshold rule)
    flags = "run"
    handles_missing = True

    def __init__(self, params: AurorParams, server) -> None:
        super().__init__(params, server)
        self._window: list[tuple[int, torch.Tensor]] = []  # (round, uploads) of the rounds the next decision reads
        self.detections: list[dict] = []  # one entry per decision
        self.detection: dict = {"detection_round": None, "flagged_users": [], "detections": self.detections}

    @property
    def rewind_rounds(self) -> int:
        """How many rounds back the loop must be able to rewind the global model (0: never)."""
        return self.params.window_rounds if self.params.recovery == "restart" else 0

    def _next_decision(self, round_: int) -> int | None:
        """The first round >= ``round_`` at which AUROR will decide (``None``: it will not again)."""
        k, every = self.params.window_rounds, self.params.redetect_every
        if round_ <= k:
            return k if every or not self.detections else None
        return round_ + (-(round_ - k)) % every if every else None

    def aggregate(self, uploads: Uploads) -> Aggregate:
        p, round_ = self.params, uploads.round
        decision = self._next_decision(round_)
        rewind = None
        if decision is not None and decision - round_ < p.window_rounds:
            self._window = [e for e in self._window if e[0] > decision - p.window_rounds] + [
                (round_, uploads.user_ids, uploads.updates)]
            if decision == round_ and len(self._window) == p.window_rounds:
                new = self._detect(uploads)
                if new and p.recovery == "restart":
                    rewind, self._window = round_ - p.window_rounds, []
        flagged = torch.tensor(sorted(self.flagged), dtype=torch.long, device=uploads.user_ids.device)
        accepted = present_rows(uploads.updates) & ~torch.isin(uploads.user_ids, flagged)
        return Aggregate(aggregate_per_coordinate(uploads.updates, accepted), accepted / accepted.sum().clamp(min=1),
                         rewind_to=rewind)

    def report(self) -> dict:
        return self.detection

    def state_dict(self) -> dict:
        return {"window": [list(e) for e in self._window], "flagged": sorted(self.flagged),
                "detection": self.detection}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints of earlier versions hold (round, uploads) or the uploads of rounds 1.. only: everyone's rows
        entries = [e if isinstance(e, (list, tuple)) else (i + 1, e) for i, e in enumerate(state["window"])]
        self._window = [tuple(e) if len(e) == 3 else (e[0], torch.arange(len(e[1])), e[1]) for e in entries]
        self.flagged = set(state["flagged"])
        self.detection = state["detection"]
        self.detections = self.detection.setdefault("detections", [])

    def _detect(self, uploads: Uploads) -> set[int]:
        """Decide from the window among the users not flagged yet; returns the users it flags now."""
        p = self.params
        # (rounds, users seen in the window, parameters); NaN: not uploaded, left out, or absent from that round
        # (users.per_round). Rounds restored from a checkpoint are on the CPU
        window, ids = window_tensor(self._window, uploads.updates.device)
        if p.redetect_every == 0:
            self._window = []  # no later decision reads it
        judged = [i for i, u in enumerate(ids) if u not in self.flagged]
        if len(judged) < 2:
            return set()
        if len(judged) < len(ids):
            window = window[:, judged]
        # a user absent from every window round gets an all-NaN row: no feature, score 0, never flagged
        features = window_mean(window) if p.window_reduce == "mean" else window.permute(1, 0, 2).flatten(1)
        d = Auror(p.alpha, p.tau, p.alpha_mode).fit(features)
        flags = d.flagged_ if p.threshold == "tau" else gap_flags(d, p.min_gap, p.min_ratio, p.min_indicative)
        judged_ids = [ids[i] for i in judged]
        new = {judged_ids[i] for i in flags.nonzero()[0]}
        self.flagged |= new
        first = not self.detections
        record = {
            "round": uploads.round,
            "window": [uploads.round - p.window_rounds + 1, uploads.round],
            "flagged_users": sorted(new),
            "scores": {str(u): round(float(s), 4) for u, s in zip(judged_ids, d.scores_)},
            "num_indicative_features": int(d.indicative_.sum()),
        }
        self.detections.append(record)
        if first:
            self.detection.update({
                "detection_round": uploads.round,
                "scores": record["scores"],
                "threshold": d.threshold_,
                "num_features": int(d.indicative_.size),
                "num_indicative_features": record["num_indicative_features"],
            })
        self.detection["flagged_users"] = sorted(self.flagged)
        log.info("  AUROR at round %d: %d of %d features indicative, flagged users %s", uploads.round,
                 d.indicative_.sum(), d.indicative_.size, sorted(new) or "none")
        return new
    @classmethod
    def check_config(cls, params: AurorParams, cfg, key: str) -> None:
        super().check_config(params, cfg, key)
        rounds = cfg.training.rounds
        check(params.window_rounds <= rounds, f"{key}.window_rounds", f"must be in [1, training.rounds={rounds}]",
              params.window_rounds)

    @classmethod
    def search_space(cls, trial, cfg) -> list[str]:
        key = f"defense.{cls.name}"
        mode = trial.suggest_categorical(f"{key}.alpha_mode", list(ALPHA_RANGES))
        low, high, log_scale = ALPHA_RANGES[mode]
        # one alpha parameter per mode: the two ranges are different quantities
        alpha = trial.suggest_float(f"{key}.alpha[{mode}]", low, high, log=log_scale)
        window = trial.suggest_int(f"{key}.window_rounds", 1, min(MAX_WINDOW_ROUNDS, cfg.training.rounds))
        chosen = [f"{key}.alpha_mode={mode}", f"{key}.alpha={alpha!r}", f"{key}.window_rounds={window}"]
        if cfg.section(key).threshold == "gap":  # the rule that flags: its own knob
            return chosen + [f"{key}.min_gap={trial.suggest_float(f'{key}.min_gap', *GAP_RANGE, log=True)!r}"]
        return chosen + [f"{key}.tau={trial.suggest_float(f'{key}.tau', *TAU_RANGE)!r}"]

    @classmethod
    def warmup_rounds(cls, params: AurorParams, cfg) -> int:
        """Rounds before which a trial must not be pruned: detection cannot have happened yet."""
        return min(MAX_WINDOW_ROUNDS, cfg.training.rounds)
