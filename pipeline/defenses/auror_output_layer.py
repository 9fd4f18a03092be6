"""AUROR as the public FLPoison re-implementation reads it (FLPoison's
``aggregators/auror.py``), offered to compare the two readings of Shen,
Tople, Saxena (ACSAC 2016); the faithful one is :mod:`pipeline.defenses.auror`.

The differences from the faithful reading:

- only the **output layer's** parameters (the last layer's weight and bias)
  are features;
- during the first ``find_rounds`` rounds the indicative features are found
  anew each round (1-D 2-means, centre distance >= ``alpha``); after that
  they stay fixed;
- every round, one **multi-dimensional** 2-means over the users' values of the
  indicative features (scikit-learn ``KMeans(n_clusters=2, random_state=0)``,
  as FLPoison) splits the users; the larger cluster is aggregated, the other
  left out for that round. There is no per-user vote and no ``tau``.

No indicative feature (or fewer than 2 users): nobody is left out that round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pipeline.lazy import torch

from pipeline.core.masking import aggregate_per_coordinate
from pipeline.core.server import Aggregate, ParameterSlice, Uploads, present_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number
from pipeline.defenses.clustering import two_means_1d


def output_layer(layout: tuple[ParameterSlice, ...]) -> slice:
    """The coordinates of the last layer's parameters (every tensor of the module that holds the last one)."""
    owner = layout[-1].name.rpartition(".")[0]
    first = next(p for p in layout if p.name.rpartition(".")[0] == owner)
    return slice(first.start, layout[-1].stop)


def indicative_features(features: torch.Tensor, alpha: float) -> torch.Tensor:
    """Indices of the columns of ``features`` (users, F) whose 1-D 2-means centres are at least ``alpha`` apart."""
    clusters = two_means_1d(features.T)
    distance = torch.nan_to_num(clusters.high - clusters.low, nan=0.0)
    return (distance >= alpha).nonzero().flatten()


def majority_cluster(values: np.ndarray) -> np.ndarray:
    """Bool (users,): the larger of the two k-means clusters of the rows of ``values`` (FLPoison's vote; a tie
    keeps cluster 0, as FLPoison's ``1 if sum(labels) > n/2 else 0``)."""
    from sklearn.cluster import KMeans  # here, not at the top: scikit-learn's import costs a second at start-up

    labels = KMeans(n_clusters=2, random_state=0, n_init=10).fit(values).labels_
    benign = 1 if labels.sum() > len(labels) / 2 else 0
    return labels == benign


@dataclass
class AurorOutputLayerParams(DefenseParams):
    alpha: float = 0.002  # FLPoison's default indicative_threshold
    find_rounds: int = 10  # FLPoison's indicative_find_epoch: the indicative features are fixed after it

    def validate(self, key: str) -> None:
        check(finite_number(self.alpha) and self.alpha >= 0, f"{key}.alpha", "must be a finite number >= 0", self.alpha)
        check(self.find_rounds >= 1, f"{key}.find_rounds", "must be >= 1", self.find_rounds)


@register
class AurorOutputLayer(Defense):
    """FLPoison's AUROR: output layer only, indicative features fixed after ``find_rounds``, one 2-means vote."""

    name = "auror_output_layer"
    summary = "AUROR as FLPoison reads it: output layer only, one multi-dimensional 2-means vote per round"
    Params = AurorOutputLayerParams
    search_ranges = {"alpha": (1e-4, 0.1, True)}
    flags = "round"
    handles_missing = False  # k-means over users needs every user's value of every indicative feature

    def __init__(self, params: AurorOutputLayerParams, server) -> None:
        super().__init__(params, server)
        self.indicative = torch.zeros(0, dtype=torch.long)

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        present = present_rows(updates)
        features = updates[present][:, output_layer(self.server.layout)]
        if uploads.round <= self.params.find_rounds:
            self.indicative = indicative_features(features, self.params.alpha).cpu()
        accepted = present.clone()
        if len(self.indicative) and int(present.sum()) >= 2:
            values = features[:, self.indicative.to(features.device)].double().cpu().numpy()
            accepted[present] = torch.as_tensor(majority_cluster(values), device=updates.device)
        return Aggregate(aggregate_per_coordinate(updates, accepted), accepted / accepted.sum().clamp(min=1))

    def report(self) -> dict:
        return {"num_indicative_features": len(self.indicative)}

    def state_dict(self) -> dict:
        return {"indicative": self.indicative}

    def load_state_dict(self, state: dict) -> None:
        self.indicative = state["indicative"]
