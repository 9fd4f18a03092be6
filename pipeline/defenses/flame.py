"""FLAME (Nguyen et al., USENIX Security 2022, "FLAME: Taming Backdoors in
Federated Learning"): admit the users in the majority cluster of update
directions, clip every admitted update to the median norm, add Gaussian noise.

Each round, over the ``n`` users with a whole upload:

1. cosine distances ``d_ij = 1 - cos(w_i, w_j)`` between the updates (the paper
   clusters the local models; like FLPoison we cluster their updates, which is
   what the server sees here);
2. HDBSCAN on ``d`` (``min_cluster_size = n // 2 + 1``, ``min_samples = 1``,
   ``allow_single_cluster``): the users in the largest cluster are admitted,
   the others (noise, or another cluster) left out. A cluster holds a majority,
   so there is at most one; with none, nobody is admitted and the step is zero
   (no noise either). With one cluster, HDBSCAN labels noise the members that
   drop out of it before it dissolves: honest stragglers are left out too (with
   10 honest users around one direction, typically only 6 are admitted);
3. adaptive clipping: ``S_t`` = the median L2 norm of all ``n`` updates; each
   admitted update is scaled by ``min(1, S_t / ‖w_i‖)``; the step is their mean;
4. adaptive noise: ``N(0, (λ S_t)^2)`` added to every coordinate of the step
   (the paper adds it to the new global model: the same thing), drawn on the
   CPU from a generator seeded by ``(run seed, round)`` so runs are reproducible.

With fewer than 2 whole uploads: their plain mean (no clustering, clipping, noise).

Parameters (``defense.flame``): ``noise_lambda`` λ >= 0 (default 0.001, the
paper's for image classification; 0: no noise).

``Aggregate.weights``: ``1 / |admitted|`` for the admitted users (each clipped
update's share of the mean), 0 for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pipeline.lazy import torch

from pipeline.core.device import seeded_generator
from pipeline.core.server import Aggregate, Uploads, complete_rows, weighted_mean
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number
from pipeline.defenses.foolsgold import cosine_similarities

# FLAME's noise stream in a round, apart from the users' and the loop's streams
FLAME_STREAM = 2**32 - 4


def cosine_distances(updates: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between the rows of ``updates`` (n, P): (n, n) float64, symmetric, zero diagonal."""
    d = 1 - cosine_similarities(updates)
    return ((d + d.T) / 2).clamp_min(0).fill_diagonal_(0)


def majority_cluster(distances: torch.Tensor) -> torch.Tensor:
    """The users (bool (n,)) HDBSCAN puts in the largest cluster of the distances (n, n)."""
    n = len(distances)
    from sklearn.cluster import HDBSCAN  # here, not at the top: scikit-learn's import costs a second at start-up

    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(distances.cpu().numpy()).labels_
    clustered = labels[labels >= 0]
    admitted = labels == np.bincount(clustered).argmax() if len(clustered) else np.zeros(n, dtype=bool)
    return torch.as_tensor(admitted, device=distances.device)


def median_clipped_mean(updates: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (float64 (P,)) of the ``kept`` rows (bool (n,), at least one) of ``updates``, each scaled to at
    most the median L2 norm of all n rows (S_t), and that median."""
    norms = updates.double().norm(dim=1)
    bound = torch.quantile(norms, 0.5)
    scale = (bound / norms[kept].clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1)
    return (updates[kept].double() * scale[:, None]).mean(0), bound


def flame(updates: torch.Tensor, noise_lambda: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAME's ``(step (P,), admitted (n,) bool)`` for the updates (n >= 2, P);
    the noise is drawn from the CPU ``generator``."""
    admitted = majority_cluster(cosine_distances(updates))
    if not admitted.any():
        return updates.new_zeros(updates.shape[1]), admitted
    step, bound = median_clipped_mean(updates, admitted)
    if noise_lambda > 0:
        noise = torch.randn(updates.shape[1], generator=generator, dtype=torch.float64)
        step = step + noise_lambda * bound * noise.to(updates.device)
    return step.to(updates.dtype), admitted


@dataclass
class FlameParams(DefenseParams):
    noise_lambda: float = 0.001  # λ: noise std = λ x median update norm; 0 disables it

    def validate(self, key: str) -> None:
        lam = self.noise_lambda
        check(finite_number(lam) and lam >= 0,
              f"{key}.noise_lambda", "must be a finite number >= 0", lam)


@register
class Flame(Defense):
    """Admit the majority cluster of update directions, clip to the median norm, add noise."""

    name = "flame"
    summary = "FLAME (USENIX Security 2022): HDBSCAN on cosine distances, median-norm clipping, Gaussian noise"
    Params = FlameParams
    search_ranges = {"noise_lambda": (1e-4, 1e-2, True)}
    flags = "round"
    composable = True
    handles_missing = False

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        used = complete_rows(updates)
        weights = torch.zeros(len(updates), dtype=updates.dtype, device=updates.device)
        if used.sum() < 2:
            weights[used] = 1.0
            return Aggregate(weighted_mean(updates, weights), weights)
        generator = seeded_generator(self.server.seed, uploads.round, FLAME_STREAM)
        step, admitted = flame(updates[used], self.params.noise_lambda, generator)
        weights[used] = admitted.to(updates.dtype) / admitted.sum().clamp_min(1)
        return Aggregate(step, weights)
