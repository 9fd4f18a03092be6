"""FLDetector (Zhang, Cao, Jia & Gong, "FLDetector: Defending federated learning against model
poisoning attacks via detecting malicious clients", KDD 2022): flag the users whose updates are not
consistent with their own history, as an L-BFGS estimate of the Hessian predicts it.

An honest user's update changes smoothly with the global model: by the Cauchy mean value theorem
``g_i^t ~ g_i^{t-1} + H (w_t - w_{t-1})``, with ``H`` the Hessian of its loss near the global model.
The server estimates ``H v`` with L-BFGS from the last ``window`` N pairs of global model differences
``dw`` and global update differences ``dg``, and scores each user by how far its update lands from
that prediction. Each round, with the round's uploads at round r and ``a_r`` the step this defense
returns (the global update):

1. the pairs: at the end of round k >= 2 the pair ``dw = a_{k-1}`` (``w_{k-1} - w_{k-2}``, the model
   difference the users of round k and k - 1 trained from) and ``dg = a_k - a_{k-1}`` joins the buffer;
   the last N are kept;
2. :func:`lbfgs_hvp`: the compact L-BFGS product (the paper's Algorithm 1; Byrd, Nocedal & Schnabel
   1994) ``H v ~ sigma v - [sigma S, Y] M^-1 [sigma S^T v; Y^T v]``, ``S``, ``Y`` the buffer's ``dw``,
   ``dg`` as columns, ``sigma = y_N^T s_N / s_N^T s_N`` of the newest pair, ``M = [[sigma S^T S, L],
   [L^T, -D]]`` with ``L`` the strictly lower triangle and ``D`` the diagonal of ``S^T Y``, for
   ``v = a_{r-1}`` (``w_{r-1} - w_{r-2}``);
3. each user i that uploaded a whole update this round and the last: ``d_i = ||u_i^{r-1} + H v - u_i^r||``;
   normalised over those users (:func:`normalised_distances`);
4. :func:`suspicious_scores`: a user's score is the mean of its normalised distances over the last N
   rounds;
5. from round ``warmup + 1`` on, until the first detection: :func:`gap_statistic` (Tibshirani, Walther &
   Hastie 2001) over the scores, with B = ``gap_references`` reference sets drawn uniformly over the
   scores' range; when it finds more than one cluster, :func:`kmeans_split` (scikit-learn's ``KMeans``,
   2 clusters) on the scores and the cluster with the larger mean score is flagged;
6. the step: the mean of the whole updates of the users not flagged (from the detection round on, the
   flagged users are left out of every aggregate).

Where we had to choose, or deviate from the paper, and why:

- **Updates, not gradients.** Uploads are parameter changes (about ``-lr x`` gradient); L-BFGS's product
  is linear in the ``dg`` pairs (scaling every ``y`` and ``sigma`` by ``c`` scales ``B`` by ``c``), so
  predicting updates from update differences is the paper's prediction of gradients, rescaled; the
  server's learning rate scales every ``dw`` and ``v`` alike and cancels in ``H v``.
- **Which pairs.** Round r's users trained from ``w_{r-1}``, round r - 1's from ``w_{r-2}``: the pair of
  round k is ``(a_{k-1}, a_k - a_{k-1})``, the update difference beside the model difference it came
  from, and ``v`` is the last step, not yet in a pair (the paper's ``Delta W_t = {Delta w_{t-N}..
  Delta w_{t-1}}`` and ``v = w_t - w_{t-1}``). FLPoison pairs ``a_k`` with ``a_k - a_{k-1}``, a round apart.
- **dw is this defense's step.** The defense never sees the global model: ``dw`` is the step it
  returned, which is ``w_k - w_{k-1}`` exactly under ``server.optimizer: sgd`` (any ``lr``, see above; the
  loop zeroes an overflowed coordinate, never seen in practice). Under ``momentum`` or ``adam`` the model
  moves by the optimiser's step, not the aggregate: ``dw`` is then an approximation.
- **Degenerate pairs.** A round with no whole update (the guard left every row out) forms no pair, and
  the next round has no last round to predict from. A pair with ``dw = 0`` carries no curvature and is
  dropped; with no pair left the prediction is the user's last update. ``M`` is inverted by a
  pseudo-inverse (the inverse whenever it exists; pairs in a linear dependence do not break it).
- **Normalisation.** The paper divides ``d`` by its L1 norm; we also multiply by the number of users
  with a distance that round (mean 1). With everyone taking part that is a constant factor (the gap
  statistic and k-means are scale-invariant: the same decisions); under ``users.per_round`` it keeps
  rounds with different numbers of predicted users comparable.
- **Sampled users** (``users.per_round``, ``Uploads.user_ids`` the round's participants). Only a user
  with a whole update this round and the last gets a distance (the paper's prediction starts from
  last round's update); a user's score averages the distances it has in the last N rounds; a user with
  none is not judged. Users absent, left out by the server's guard, or uploading NaN have no update
  that round. In a cross-device run where few users take part in consecutive rounds, few are judged.
- **The gap statistic.** Tibshirani's rule: the number of clusters is the smallest k with
  ``Gap(k) >= Gap(k+1) - s_{k+1}``, ``Gap(k) = mean_b log W*_kb - log W_k``, ``W_k`` the within-cluster
  sum of squares of k-means with k clusters, ``s_k = sd_b(log W*_kb) sqrt(1 + 1/B)``. Only whether
  that k exceeds 1 matters, which reads ``Gap(1)`` and ``Gap(2)`` only: k = 1 exactly when ``Gap(1) >=
  Gap(2) - s_2`` (the paper's ``K_max`` does not matter). ``W_2`` is the exact 1-D 2-means optimum
  (:func:`~pipeline.defenses.clustering.two_means_1d`, vectorised over the B reference sets: the
  minimum scikit-learn's restarts look for, tested equal). The original code's within-cluster
  dispersion and its ``s_{k}`` in place of ``s_{k+1}``, and FLPoison's ``k + 1``, are not followed: we
  follow Tibshirani et al. A decision needs at least 3 scored users (with 2, ``W_2 = 0``: always 2
  clusters); scores all equal: 1 cluster.
- **Reference draws** come from ``seeded_generator(run seed, round, FLDETECTOR_STREAM)`` on the CPU;
  the same generator then draws ``KMeans``' ``random_state``: a run is reproducible and a resumed one
  draws the same.
- **When it decides.** The paper starts once the window is full; here from round ``warmup + 1``
  (``warmup = 0``: ``window + 1``, the first round whose score averages N distances, each predicted from
  N pairs: round 12 by default). It decides every round until a decision flags someone, then stops:
  the paper's Algorithm 2 returns the malicious clients it found. With ``training.rounds <= warmup``
  it never decides (flags nobody); nothing refuses that config.
- **Recovery.** The paper restarts training from scratch without the detected clients:
  ``recovery: restart`` rewinds to round 0 (the initial model) at the detection round, and rounds
  1.. are trained again without the flagged users (``Aggregate.rewind_to``; the loop keeps every
  round's global model for it, ``rounds x parameters`` floats, and counts ``rounds_retrained``).
  ``none`` (the default) only leaves them out from the detection round on, as FLPoison does.
- **The aggregate** is the mean of the unflagged users' whole updates, as FLPoison's. The paper also
  runs FLDetector in front of Trimmed-mean and Median; no such option here (a robust rule's aggregate
  would be the ``dg`` the pairs read).

Parameters (``defense.fldetector``): ``window`` N >= 1 (default 10, the paper's), ``warmup`` >= 0 (decide
from round ``warmup + 1``; default 0: ``window + 1``), ``gap_references`` B >= 1 (default 20, the original
code's), ``recovery`` ``none`` | ``restart`` (default ``none``).

``Aggregate.weights``: ``1 / (number of users counted)`` for the unflagged users with a whole update, 0
for the others. ``detection.json`` records every decision (round, the gap statistic, every judged
user's score) and the users flagged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.lazy import torch

from pipeline.core.device import seeded_generator
from pipeline.core.server import Aggregate, Uploads, complete_rows, weighted_mean
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, whole_number
from pipeline.defenses.clustering import two_means_1d

log = logging.getLogger("auror")

# FLDetector's reference sets and KMeans seed in a round, apart from every other random stream
FLDETECTOR_STREAM = 2**32 - 12
RECOVERIES = ("none", "restart")
MIN_JUDGED = 3  # users a decision needs: with 2, two clusters always fit exactly
EVERY_ROUND = 2**31 - 1  # rewind_rounds under restart: the loop keeps every round's model (back to round 0)


def lbfgs_hvp(dws: torch.Tensor, dgs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The compact L-BFGS estimate of ``H v`` (P,) from the pairs ``dws``, ``dgs`` (N, P), oldest first:
    ``B v`` for ``B`` the N BFGS updates of ``sigma I`` (``sigma`` of the newest pair). Pairs with
    ``dw = 0`` are dropped; with none, zeros. Float64 inside; ``v``'s dtype out."""
    s, y = dws.double(), dgs.double()
    kept = (s != 0).any(1)
    if not kept.all():
        s, y = s[kept], y[kept]
    if len(s) == 0:
        return torch.zeros_like(v)
    x = v.double()
    sigma = (y[-1] @ s[-1]) / (s[-1] @ s[-1])
    sty = s @ y.T  # (S^T Y)_ij = s_i . y_j
    lower = torch.tril(sty, -1)
    m = torch.cat([torch.cat([sigma * (s @ s.T), lower], 1),
                   torch.cat([lower.T, -torch.diag(torch.diagonal(sty))], 1)], 0)
    p = torch.cat([sigma * (s @ x), y @ x])
    q = torch.linalg.pinv(m, hermitian=True) @ p  # M is symmetric; the inverse when it has one
    return (sigma * x - sigma * (q[: len(s)] @ s) - q[len(s):] @ y).to(v.dtype)


def normalised_distances(distances: torch.Tensor) -> torch.Tensor:
    """``d / ||d||_1`` times the number of users (mean 1): the paper's normalisation up to that
    constant, comparable across rounds with different numbers of users; zeros when every d is 0."""
    total = distances.sum()
    return distances * (len(distances) / total) if total > 0 else torch.zeros_like(distances)


def prediction_distances(previous: torch.Tensor, current: torch.Tensor, hvp: torch.Tensor) -> torch.Tensor:
    """``||previous_i + hvp - current_i||`` for each row (users, P) -> (users,) float64."""
    return torch.linalg.vector_norm(previous + hvp - current, dim=1, dtype=torch.float64)


def suspicious_scores(history: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's mean normalised distance over the rounds of ``history`` ((ids, distances) per round,
    ids ascending) in which it has one: ``(ids (users,) ascending, scores (users,) float64)`` over the
    users with at least one."""
    if not history:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    ids = torch.cat([i.cpu() for i, _ in history]).unique()  # sorted
    table = torch.full((len(history), len(ids)), math.nan, dtype=torch.float64)
    for r, (users, d) in enumerate(history):  # a loop over the window's rounds, not over users
        table[r, torch.searchsorted(ids, users.cpu())] = d.cpu().double()
    return ids, table.nanmean(0)


def within_sum_of_squares(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_1`` and ``W_2`` of each row of ``x`` (rows, n) float64: the sum of squares about the mean, and
    that of the optimal 1-D 2-means partition (exact: :func:`two_means_1d`)."""
    w1 = (x - x.mean(1, keepdim=True)).square().sum(1)
    upper = two_means_1d(x).upper
    count = upper.sum(1, keepdim=True)
    high = (x * upper).sum(1, keepdim=True) / count.clamp(min=1)
    low = (x * ~upper).sum(1, keepdim=True) / (x.shape[1] - count).clamp(min=1)
    w2 = (x - torch.where(upper, high, low)).square().sum(1)
    return w1, w2


class Gap(NamedTuple):
    gap: tuple[float, float]  # Gap(1), Gap(2)
    sd: tuple[float, float]  # s_1, s_2: sd of log W*_k over the references x sqrt(1 + 1/B)

    @property
    def clusters(self) -> int:
        """Tibshirani's number of clusters, 1 or "more" (2): 1 when ``Gap(1) >= Gap(2) - s_2``."""
        return 1 if self.gap[0] >= self.gap[1] - self.sd[1] else 2


def gap_statistic(scores: torch.Tensor, references: int, generator: torch.Generator) -> Gap:
    """The gap statistic of the 1-D ``scores`` (n >= 2,) for k = 1, 2, against ``references`` sets of n
    values drawn uniformly over the scores' range from the CPU ``generator``. Scores all equal: 1
    cluster (no reference spread either)."""
    x = scores.detach().double().cpu()
    low, high = x.min(), x.max()
    if high == low:
        return Gap((0.0, 0.0), (0.0, 0.0))
    fake = low + (high - low) * torch.rand(references, len(x), generator=generator, dtype=torch.float64)
    w1, w2 = within_sum_of_squares(torch.cat([x[None], fake]))
    logs = torch.stack([w1, w2]).log()  # (2, 1 + B); W_2 = 0 (two exact groups): -inf, Gap(2) = +inf
    expected, spread = logs[:, 1:].mean(1), logs[:, 1:].std(1, correction=0) * math.sqrt(1 + 1 / references)
    gap = expected - logs[:, 0]
    return Gap((float(gap[0]), float(gap[1])), (float(spread[0]), float(spread[1])))


def kmeans_split(scores: torch.Tensor, random_state: int) -> torch.Tensor:
    """scikit-learn's 2-means of the 1-D ``scores`` (n >= 2,): the users of the cluster with the larger
    mean score (bool (n,))."""
    from sklearn.cluster import KMeans  # here, not at the top: scikit-learn's import costs a second at start-up

    values = scores.detach().double().cpu().numpy()
    labels = KMeans(n_clusters=2, n_init=10, random_state=random_state).fit(values[:, None]).labels_
    high = int(values[labels == 1].mean() > values[labels == 0].mean())
    return torch.as_tensor(labels == high)


def finite_or_none(value: float) -> float | None:
    """``value`` rounded for ``detection.json``, ``None`` when not finite."""
    return round(value, 6) if math.isfinite(value) else None


@dataclass
class FLDetectorParams(DefenseParams):
    window: int = 10  # N: the L-BFGS pairs kept and the rounds a score averages
    warmup: int = 0  # decide from round warmup + 1 on; 0: window + 1 (the window full)
    gap_references: int = 20  # B: uniform reference sets of the gap statistic
    recovery: str = "none"  # none | restart: on a detection, train again from the initial model without them

    def validate(self, key: str) -> None:
        check(whole_number(self.window) and self.window >= 1, f"{key}.window", "must be an integer >= 1",
              self.window)
        check(whole_number(self.warmup) and self.warmup >= 0, f"{key}.warmup",
              "must be an integer >= 0 (0: window + 1)", self.warmup)
        check(whole_number(self.gap_references) and self.gap_references >= 1, f"{key}.gap_references",
              "must be an integer >= 1", self.gap_references)
        check(self.recovery in RECOVERIES, f"{key}.recovery", f"must be one of {', '.join(RECOVERIES)}",
              self.recovery)

    @property
    def first_decision(self) -> int:
        """The first round at which it may decide."""
        return (self.warmup or self.window + 1) + 1


@register
class FLDetector(Defense):
    """Score users by how far their updates land from an L-BFGS prediction; flag the high cluster."""

    name = "fldetector"
    summary = ("FLDetector (Zhang et al., KDD 2022): flag the users whose updates an L-BFGS Hessian estimate "
               "fails to predict (gap statistic, 2-means on the scores)")
    Params = FLDetectorParams
    flags = "run"

    def __init__(self, params: FLDetectorParams, server) -> None:
        super().__init__(params, server)
        self._dws: list[torch.Tensor] = []  # the last N pairs, oldest first
        self._dgs: list[torch.Tensor] = []
        self._last: dict[str, Any] | None = None  # the last round's: round, step, ids and whole updates
        self._history: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (round, ids, normalised d), last N
        self.decisions: list[dict] = []
        self.detection: dict = {"detection_round": None, "flagged_users": [], "decisions": self.decisions}

    @property
    def rewind_rounds(self) -> int:
        """How far back a recovery may send the global model: to round 0 under restart (0: never)."""
        return EVERY_ROUND if self.params.recovery == "restart" else 0

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates, ids, round_ = uploads.updates, uploads.user_ids, uploads.round
        whole = complete_rows(updates)
        rewind = None
        if self.detection["detection_round"] is None:
            self._score(round_, ids[whole], updates[whole])
            if round_ >= self.params.first_decision and self._decide(round_):
                if self.params.recovery == "restart":
                    rewind = 0
                self._dws, self._dgs, self._last, self._history = [], [], None, []  # no later decision reads them
        flagged = torch.tensor(sorted(self.flagged), dtype=torch.long, device=ids.device)
        accepted = whole & ~torch.isin(ids, flagged)
        weights = accepted.to(updates.dtype) / accepted.sum().clamp(min=1)
        step = weighted_mean(updates, weights)
        if self.detection["detection_round"] is None:
            self._remember(round_, step, ids[whole], updates[whole])
        return Aggregate(step, weights, rewind_to=rewind)

    def _score(self, round_: int, ids: torch.Tensor, updates: torch.Tensor) -> None:
        """This round's normalised distances of the users with a whole update this round and the last."""
        last = self._last
        if last is None or last["round"] != round_ - 1 or not self._dws or len(ids) == 0:
            return
        device = updates.device
        previous_ids = last["ids"].to(device)
        at = torch.searchsorted(previous_ids, ids).clamp(max=len(previous_ids) - 1)  # both ascending
        both = previous_ids[at] == ids
        if not both.any():
            return
        hvp = lbfgs_hvp(torch.stack(self._dws).to(device), torch.stack(self._dgs).to(device),
                        last["step"].to(device))
        d = prediction_distances(last["updates"].to(device)[at[both]], updates[both], hvp.to(updates.dtype))
        self._history = [e for e in self._history if e[0] > round_ - self.params.window] + [
            (round_, ids[both].cpu(), normalised_distances(d).cpu())]

    def _remember(self, round_: int, step: torch.Tensor, ids: torch.Tensor, updates: torch.Tensor) -> None:
        """This round's pair (the last step, the change of the step) and what the next round predicts from."""
        if len(ids) == 0:  # nobody's update: its zero step is no global update, and pairs with it no curvature
            self._last = None
            return
        last = self._last
        if last is not None and last["round"] == round_ - 1:
            previous = last["step"].to(step.device)
            self._dws = (self._dws + [previous])[-self.params.window:]
            self._dgs = (self._dgs + [step - previous])[-self.params.window:]
        self._last = {"round": round_, "step": step, "ids": ids, "updates": updates}

    def _decide(self, round_: int) -> bool:
        """The gap statistic and, with more than one cluster, the flags; whether it flagged anyone."""
        ids, scores = suspicious_scores([(i, d) for r, i, d in self._history if r > round_ - self.params.window])
        if len(ids) < MIN_JUDGED:
            return False
        generator = seeded_generator(self.server.seed, round_, FLDETECTOR_STREAM)
        gap = gap_statistic(scores, self.params.gap_references, generator)
        flagged: list[int] = []
        if gap.clusters > 1:
            state = int(torch.randint(2**31 - 1, (1,), generator=generator))
            flagged = ids[kmeans_split(scores, state)].tolist()
        self.decisions.append({
            # Gap(2) is +inf for two exact groups: recorded as None (JSON has no infinity)
            "round": round_, "clusters": gap.clusters, "gap": [finite_or_none(g) for g in gap.gap],
            "gap_sd": [finite_or_none(g) for g in gap.sd],
            "flagged_users": flagged, "scores": {str(u): round(float(s), 4) for u, s in zip(ids.tolist(), scores)},
        })
        if not flagged:
            return False
        self.flagged |= set(flagged)
        self.detection.update({"detection_round": round_, "flagged_users": sorted(self.flagged)})
        log.info("  FLDetector at round %d: gap statistic %s clusters; flagged users %s", round_, gap.clusters,
                 flagged)
        return True

    def report(self) -> dict:
        return self.detection

    def state_dict(self) -> dict[str, Any]:
        return {"dws": list(self._dws), "dgs": list(self._dgs),
                "last": None if self._last is None else dict(self._last),
                "history": [list(e) for e in self._history], "flagged": sorted(self.flagged),
                "detection": self.detection}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._dws, self._dgs = list(state["dws"]), list(state["dgs"])
        self._last = None if state["last"] is None else dict(state["last"])
        self._history = [tuple(e) for e in state["history"]]
        self.flagged = set(state["flagged"])
        self.detection = state["detection"]
        self.decisions = self.detection.setdefault("decisions", [])

    @classmethod
    def warmup_rounds(cls, params: FLDetectorParams, cfg) -> int:
        """Rounds before which a trial must not be pruned: no decision before the first decision round."""
        return min(params.first_decision, cfg.training.rounds)
