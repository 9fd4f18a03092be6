"""DeepSight (Rieger, Nguyen, Miettinen & Sadeghi, "DeepSight: mitigating backdoor attacks in
federated learning through deep model inspection", NDSS 2022).

Each round, over the ``n`` users with a whole upload:

1. **Threshold exceedings.** Each update's output-layer energy per class ``e_k = |db_k| + sum_j |dW_kj|``
   gives its normalised update energies ``NEUP_k = e_k^2 / sum_l e_l^2``; its threshold exceedings ``TE``
   count the classes with ``NEUP_k > max(threshold_factor, 1 / classes) * max_l NEUP_l``. A model trained
   on few labels (a backdoor's data is homogeneous) has a low TE: an update with ``TE <= median(TE) / 2`` is
   labelled suspicious.
2. **Three views of the models, each clustered by HDBSCAN** (``min_cluster_size``, ``min_samples``):
   the cosine distances of the output-layer bias updates; the NEUPs; and, per probe set, the division
   differences ``DDif_k = mean_x p_i(x)_k / p_G(x)_k``, the local model's class probabilities over the global
   model's on ``num_samples`` random inputs (uniform in [0, 1), the inputs' shape; ``probe_sets`` sets drawn
   once per run from the run's seed). Each clustering gives a 0/1 dissimilarity (0: same cluster); the DDif
   ones are averaged, then the three views; HDBSCAN on that (``allow_single_cluster``) is the ensemble.
3. **Poisoned clusters.** A cluster is accepted when fewer than ``tau`` of its members are suspicious. A
   model HDBSCAN leaves unclustered is a cluster of its own (accepted unless suspicious): the paper keeps
   every model in some cluster; FLPoison drops the unclustered instead.
4. **Clipping.** Every accepted update is scaled to at most the median L2 norm of all ``n`` updates; the
   step is their mean (zero when nobody is accepted).

Deviations: the paper draws 20,000 random inputs per probe set; ``num_samples`` defaults to 1,000, as each
set costs a forward pass of every user's model each round on the CPU (20,000 is a config value away). HDBSCAN
is scikit-learn's; the paper does not state its sizes: ``min_samples`` 3 as FLPoison, ``min_cluster_size``
3 where FLPoison keeps the library's 5, which merges a minority of 3 attackers among 10 users into the
majority (digits, BadNets, 10 rounds: DR 0 at 5, DR 1 and FPR 0 at 3). With fewer than 2 whole uploads: their plain mean. The models are inspected as the
global model plus each upload, through ``ServerInputs.model_outputs``.

Parameters (``defense.deepsight``): ``tau`` in (0, 1] (default 1/3, the paper's), ``threshold_factor`` >= 0
(0.01), ``num_samples`` >= 1 (1,000), ``probe_sets`` >= 1 (3), ``min_cluster_size`` >= 2 (3),
``min_samples`` >= 1 (3). Inspected models are
whole users' (their weights are flags): not a rule a pre-aggregator feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pipeline.lazy import torch

from pipeline.core.device import seeded_generator
from pipeline.core.server import Aggregate, Uploads, complete_rows, weighted_mean
from pipeline.defenses import register
from pipeline.defenses.auror_output_layer import output_layer
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number, whole_number
from pipeline.defenses.flame import cosine_distances, median_clipped_mean

DEEPSIGHT_STREAM = 2**32 - 13  # the probe inputs, apart from every other random stream


def normalised_energies(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """NEUPs (n, classes) of output-layer updates ``weight`` (n, classes, features) and ``bias`` (n, classes)."""
    energy = bias.double().abs() + weight.double().abs().sum(2)
    squared = energy**2
    return squared / squared.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def threshold_exceedings(neups: torch.Tensor, threshold_factor: float) -> torch.Tensor:
    """Each row's count of NEUPs above ``max(threshold_factor, 1 / classes)`` times its largest. (n,)."""
    factor = max(threshold_factor, 1 / neups.shape[1])
    return (neups > factor * neups.amax(1, keepdim=True)).sum(1)


def division_differences(local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """DDifs (n, classes): the mean over the probes of each local model's probabilities ``local`` (n, N, classes)
    divided by the global model's ``global_`` (N, classes)."""
    return (local.double() / global_.double().clamp_min(torch.finfo(torch.float64).tiny)).mean(1)


def hdbscan_labels(values: np.ndarray, min_cluster_size: int, min_samples: int, precomputed: bool = False,
                   single: bool = False) -> np.ndarray:
    """scikit-learn HDBSCAN's labels (-1: unclustered) of the rows of ``values`` (or of a distance matrix)."""
    from sklearn.cluster import HDBSCAN  # here, not at the top: scikit-learn's import costs a second at start-up

    return HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, allow_single_cluster=single,
                   metric="precomputed" if precomputed else "euclidean", copy=True).fit(values).labels_


def cluster_dissimilarity(labels: np.ndarray) -> np.ndarray:
    """(n, n): 0 for two models in one cluster, 1 otherwise; an unclustered model is apart from all others."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    dissimilar = (~same).astype(np.float64)
    np.fill_diagonal(dissimilar, 0)
    return dissimilar


def accepted_models(labels: np.ndarray, suspicious: np.ndarray, tau: float) -> np.ndarray:
    """bool (n,): members of the clusters with fewer than ``tau`` of them suspicious; an unclustered model
    is its own cluster."""
    clusters = np.where(labels >= 0, labels, labels.max(initial=-1) + 1 + np.arange(len(labels)))
    accepted = np.zeros(len(labels), dtype=bool)
    for cluster in np.unique(clusters):
        members = clusters == cluster
        accepted[members] = suspicious[members].sum() < tau * members.sum()
    return accepted


def clipped_mean(updates: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """The mean of the accepted rows, each scaled to at most the median L2 norm of all rows (FLAME's
    clipping, without its noise); zero when nobody is accepted. (P,)."""
    if not accepted.any():
        return updates.new_zeros(updates.shape[1])
    return median_clipped_mean(updates, accepted)[0].to(updates.dtype)


@dataclass
class DeepSightParams(DefenseParams):
    tau: float = 1 / 3  # a cluster with fewer than this share of suspicious models is accepted
    threshold_factor: float = 0.01  # NEUP threshold: max(factor, 1 / classes) x the largest NEUP
    num_samples: int = 1000  # random inputs per probe set (the paper: 20,000)
    probe_sets: int = 3  # probe sets of random inputs, one DDif clustering each
    min_cluster_size: int = 3  # HDBSCAN's, in every clustering
    min_samples: int = 3

    def validate(self, key: str) -> None:
        check(finite_number(self.tau) and 0 < self.tau <= 1, f"{key}.tau", "must be in (0, 1]", self.tau)
        check(finite_number(self.threshold_factor) and self.threshold_factor >= 0, f"{key}.threshold_factor",
              "must be a finite number >= 0", self.threshold_factor)
        for name, low in (("num_samples", 1), ("probe_sets", 1), ("min_cluster_size", 2), ("min_samples", 1)):
            value = getattr(self, name)
            check(whole_number(value) and value >= low, f"{key}.{name}", f"must be an integer >= {low}", value)


@register
class DeepSight(Defense):
    """Label the updates of homogeneous training data, cluster the models three ways, accept the clusters
    that are mostly unlabelled, clip to the median norm."""

    name = "deepsight"
    summary = "DeepSight (NDSS 2022): threshold exceedings label suspicious models, ensemble HDBSCAN, clipping"
    Params = DeepSightParams
    search_ranges = {"tau": (0.1, 0.9, False)}
    flags = "round"

    def __init__(self, params, server) -> None:
        super().__init__(params, server)
        self.probes: list[torch.Tensor] | None = None  # drawn on first use, from the run's seed only

    def probe_inputs(self) -> list[torch.Tensor]:
        if self.probes is None:
            self.probes = [torch.rand(self.params.num_samples, *self.server.input_shape,
                                      generator=seeded_generator(self.server.seed, i, DEEPSIGHT_STREAM))
                           for i in range(self.params.probe_sets)]
        return self.probes

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        used = complete_rows(updates)
        weights = torch.zeros(len(updates), dtype=updates.dtype, device=updates.device)
        rows = used.nonzero().squeeze(1)
        if len(rows) < 2:
            weights[used] = 1.0
            return Aggregate(weighted_mean(updates, weights), weights)
        x = updates[rows]
        accepted = torch.as_tensor(self.accepted(x), device=x.device)
        weights[rows[accepted]] = 1 / max(int(accepted.sum()), 1)
        return Aggregate(clipped_mean(x, accepted), weights)

    def accepted(self, x: torch.Tensor) -> np.ndarray:
        """bool (n,): the rows of the whole updates ``x`` (n, P) DeepSight accepts."""
        p = self.params
        layer = x[:, output_layer(self.server.layout)]
        classes = self.server.layout[-1].shape[0]
        weight, bias = layer[:, :-classes].reshape(len(x), classes, -1), layer[:, -classes:]
        neups = normalised_energies(weight, bias)
        te = threshold_exceedings(neups, p.threshold_factor).cpu().numpy()
        suspicious = te <= np.median(te) / 2
        size, samples = min(p.min_cluster_size, len(x)), min(p.min_samples, len(x))  # a round of few users
        views = [cluster_dissimilarity(hdbscan_labels(cosine_distances(bias).cpu().numpy(), size, samples, True)),
                 cluster_dissimilarity(hdbscan_labels(neups.cpu().numpy(), size, samples))]
        with_global = torch.cat([x.new_zeros(1, x.shape[1]), x])
        ddif_views = []
        for probe in self.probe_inputs():
            probabilities = self.server.model_outputs(with_global, probe)
            ddifs = division_differences(probabilities[1:], probabilities[0])
            ddif_views.append(cluster_dissimilarity(hdbscan_labels(ddifs.cpu().numpy(), size, samples)))
        views.append(np.mean(ddif_views, axis=0))
        ensemble = hdbscan_labels(np.mean(views, axis=0), size, samples, precomputed=True, single=True)
        return accepted_models(ensemble, suspicious, p.tau)
