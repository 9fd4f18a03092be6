"""SignGuard (Xu, Huang, Song & Lan, "Byzantine-robust Federated Learning through Collaborative Malicious
Gradient Filtering", ICDCS 2022).

Each round, over the ``n`` users with a whole upload ``g_i``:

1. norm filter: with ``M`` the median of the ``n`` L2 norms, keep the users with
   ``L <= ||g_i|| / M <= R`` (the paper's ``L = 0.1``, ``R = 3.0``);
2. sign filter: on ``k = max(1, floor(coordinate_fraction * P))`` coordinates drawn at random without
   replacement, each user's sign statistics (share of positive, zero and negative values), each of the
   three divided by its largest value over the users (``+ 1e-8``), are clustered by scikit-learn's
   ``MeanShift`` (the paper's choice); the users in the largest cluster are kept (ties: the lower label);
3. the step is the mean of the users kept by both filters, each clipped to L2 norm ``M``
   (``g_i min(1, M / ||g_i||)``); weight ``1 / |kept|`` each, 0 for the others. With nobody kept, the
   step is zero.

MeanShift as the authors' code (JianXu95/SignGuard, ``signguard_multiclass``) and FLPoison set it:
``bandwidth = estimate_bandwidth(features, quantile=0.5, n_samples=50)``, ``bin_seeding=True``,
``cluster_all=False`` (a user further than the bandwidth from every centre is in no cluster: left out).

Choices and deviations:

- the coordinates: the paper draws a random subset (as we recall it: the paper is not on this machine); the
  authors' code takes a contiguous block at a random offset. We draw a subset (``randperm(P)[:k]``), then
  ``estimate_bandwidth``'s ``random_state``, from a generator keyed by ``(run seed, round)`` on the CPU:
  the same users kept on every device and after a resume;
- the column scaling by the largest value is the authors' code's (and FLPoison's); we do not recall it in the
  paper's text;
- the norm bounds are inclusive (the authors' code: strict); the median is ``torch.quantile``'s (the mean of
  the two middle norms for an even count) in both the filter and the clipping (the authors' code clips to
  ``torch.median``, the lower middle one);
- a bandwidth of 0 (at least half the users share one feature vector exactly) is refused by MeanShift; the
  users at the most common feature vector are then the cluster;
- ``estimate_bandwidth`` at ``quantile = 0.5`` reads each user's ``int(n / 2)``-th neighbour, itself the
  first: with fewer than 4 whole uploads the bandwidth is always 0, so the step is their plain mean.

Partial (DSSGD-masked) uploads have no norm: refused.

Parameters (``defense.signguard``): ``lower_bound`` L in [0, 1] (default 0.1), ``upper_bound`` R >= 1
(default 3.0), ``coordinate_fraction`` in (0, 1] (default 0.1, the paper's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from pipeline.lazy import torch

from pipeline.core.device import seeded_generator
from pipeline.core.server import Aggregate, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number
from pipeline.defenses.krum import plain_mean

SIGNGUARD_STREAM = 2**32 - 11  # SignGuard's coordinate draws, apart from every other random stream
MIN_ROWS = 4  # below this estimate_bandwidth(quantile=0.5) reads each point's distance to itself: 0


def norm_filter(norms: torch.Tensor, median: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Users with ``lower <= norm / median <= upper`` (bool (n,)); multiplied out, so a zero median is no 0 / 0."""
    return (norms >= lower * median) & (norms <= upper * median)


def sign_features(x: torch.Tensor) -> torch.Tensor:
    """Each row's share of positive, zero and negative values of ``x`` (n, k), each column divided by its
    largest value over the rows (+ 1e-8). float64 (n, 3)."""
    shares = torch.stack([(x > 0).sum(1), (x == 0).sum(1), (x < 0).sum(1)], dim=1).double() / x.shape[1]
    return shares / (shares.max(0).values + 1e-8)


def largest_sign_cluster(features: np.ndarray, random_state: int) -> np.ndarray:
    """The rows of ``features`` (n, 3) in MeanShift's largest cluster (bool (n,)); bandwidth by
    ``estimate_bandwidth(quantile=0.5, n_samples=50)``; rows in no cluster are out."""
    from sklearn.cluster import MeanShift, estimate_bandwidth  # here: scikit-learn's import costs a second

    bandwidth = estimate_bandwidth(features, quantile=0.5, n_samples=50, random_state=random_state)
    if bandwidth <= 0:  # MeanShift refuses it: half the rows coincide, the most common vector is the cluster
        _, inverse, counts = np.unique(features, axis=0, return_inverse=True, return_counts=True)
        return inverse.reshape(-1) == counts.argmax()
    with warnings.catch_warnings():  # with few users every point has its own bin: MeanShift seeds from them all
        warnings.filterwarnings("ignore", message="Binning data failed")
        labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_
    clustered = labels[labels >= 0]
    if len(clustered) == 0:
        return np.zeros(len(features), dtype=bool)
    return labels == np.bincount(clustered).argmax()


def signguard(x: torch.Tensor, lower: float, upper: float, coordinate_fraction: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SignGuard's ``(step (P,), kept (n,) bool)`` for the whole updates ``x`` (n >= 4, P); the coordinates
    and the bandwidth's sub-sample are drawn from the CPU ``generator``."""
    n, size = x.shape
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    median = torch.quantile(norms, 0.5)
    by_norm = norm_filter(norms, median, lower, upper)
    k = max(1, int(coordinate_fraction * size + 1e-9))  # floor, so 0.29 x 100 is 29
    coordinates = torch.randperm(size, generator=generator)[:k].to(x.device) if k < size else slice(None)
    random_state = int(torch.randint(2**31 - 1, (1,), generator=generator))
    features = sign_features(x[:, coordinates]).cpu().numpy()
    by_sign = torch.as_tensor(largest_sign_cluster(features, random_state), device=x.device)
    kept = by_norm & by_sign
    if not kept.any():
        return x.new_zeros(size), kept
    scale = (median / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1)  # clip to the median norm
    step = (scale[kept].to(x.dtype) @ x[kept]) / int(kept.sum())
    return step, kept


@dataclass
class SignGuardParams(DefenseParams):
    lower_bound: float = 0.1  # L: keep users with L <= norm / median norm ...
    upper_bound: float = 3.0  # R: ... <= R
    coordinate_fraction: float = 0.1  # share of the coordinates drawn for the sign statistics

    def validate(self, key: str) -> None:
        check(finite_number(self.lower_bound) and 0 <= self.lower_bound <= 1, f"{key}.lower_bound",
              "must be in [0, 1] (the median user must pass)", self.lower_bound)
        check(finite_number(self.upper_bound) and self.upper_bound >= 1, f"{key}.upper_bound",
              "must be a finite number >= 1 (the median user must pass)", self.upper_bound)
        check(finite_number(self.coordinate_fraction) and 0 < self.coordinate_fraction <= 1,
              f"{key}.coordinate_fraction", "must be in (0, 1]", self.coordinate_fraction)


@register
class SignGuard(Defense):
    """Keep the users whose norm is near the median's and whose sign statistics fall in the largest
    MeanShift cluster; average them clipped to the median norm. The others are left out this round."""

    name = "signguard"
    summary = "SignGuard (Xu et al. 2022): norm bounds and MeanShift on sign statistics, median-norm clipping"
    Params = SignGuardParams
    search_ranges = {"upper_bound": (1.5, 10.0, True)}
    flags = "round"
    composable = True
    handles_missing = False

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        usable = complete_rows(updates)
        if usable.sum() < MIN_ROWS:
            return plain_mean(updates, usable)
        p = self.params
        generator = seeded_generator(self.server.seed, uploads.round, SIGNGUARD_STREAM)
        step, kept = signguard(updates[usable], p.lower_bound, p.upper_bound, p.coordinate_fraction, generator)
        weights = torch.zeros(len(updates), dtype=updates.dtype, device=updates.device)
        weights[usable] = kept.to(updates.dtype) / kept.sum().clamp_min(1)
        return Aggregate(step, weights)
