"""Pre-aggregators: rules that mix the round's updates into other rows before a robust rule
aggregates them, written in front of it as one arm, ``nnm+median`` (:mod:`pipeline.defenses.compose`).

- ``nnm`` (Allouah, Farhadkhani, Guerraoui, Gupta, Pinot & Stephan, "Fixing by mixing: a recipe
  for optimal Byzantine ML under heterogeneity", AISTATS 2023): each update is replaced by the mean
  of its ``n - f`` nearest updates (itself included, Euclidean), ``f = floor(byzantine_fraction x n)``
  lowered to ``n - 1``. byzfl's ``NNM(f)`` (tested equal).
- ``bucketing`` (Karimireddy, He & Jaggi, "Byzantine-robust learning on heterogeneous datasets via
  bucketing", ICLR 2022): the updates in a random order, cut into buckets of ``bucket_size``, each
  bucket's mean a row (a last, smaller bucket too). The order comes from a generator keyed by
  (run seed, round); byzfl's ``Bucketing(s)`` with torch's generator seeded alike (tested equal).

Neither is an arm alone. A pre-aggregator's rows are no longer one user's each, so the rule's
weights flag nobody: a composed arm reports no DR / FPR (``-``), only what its step does.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.device import seeded_generator
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, whole_number
from pipeline.defenses.krum import assumed_attackers, pairwise_sq_distances

BUCKET_STREAM = 2**32 - 7  # bucketing's order, apart from every other random stream


def nearest_neighbour_mixing(x: torch.Tensor, f: int) -> torch.Tensor:
    """Each row of ``x`` (n, P) replaced by the mean of its ``n - f`` nearest rows (itself included). (n, P)."""
    nearest = pairwise_sq_distances(x).topk(len(x) - f, dim=1, largest=False).indices  # (n, n - f)
    return x[nearest].mean(1)


def bucket_means(x: torch.Tensor, size: int, order: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (n, P) in ``order``, cut into buckets of ``size`` (the last may be smaller): each
    bucket's mean. (ceil(n / size), P)."""
    return torch.stack([bucket.mean(0) for bucket in x[order].split(size)])


@dataclass
class NnmParams(DefenseParams):
    byzantine_fraction: float = 0.3  # f = floor(fraction x n): each row is the mean of its n - f nearest

    def validate(self, key: str) -> None:
        check(0 <= self.byzantine_fraction < 0.5, f"{key}.byzantine_fraction", "must be in [0, 0.5)",
              self.byzantine_fraction)


@register
class Nnm(Defense):
    """Nearest-neighbour mixing, in front of a rule."""

    name = "nnm"
    summary = "pre-aggregator: each update -> the mean of its n - f nearest (Allouah et al. 2023); arm nnm+<rule>"
    Params = NnmParams
    flags = "none"
    pre_aggregator = True

    def transform(self, updates: torch.Tensor, round_: int) -> torch.Tensor:
        f = assumed_attackers(self.params.byzantine_fraction, len(updates), len(updates) - 1)
        return nearest_neighbour_mixing(updates, f)


@dataclass
class BucketingParams(DefenseParams):
    bucket_size: int = 2  # s: updates averaged per bucket

    def validate(self, key: str) -> None:
        check(whole_number(self.bucket_size) and self.bucket_size >= 1,
              f"{key}.bucket_size", "must be an integer >= 1", self.bucket_size)


@register
class Bucketing(Defense):
    """Random buckets' means, in front of a rule."""

    name = "bucketing"
    summary = "pre-aggregator: means of random buckets of s updates (Karimireddy et al. 2022); arm bucketing+<rule>"
    Params = BucketingParams
    flags = "none"
    pre_aggregator = True

    def transform(self, updates: torch.Tensor, round_: int) -> torch.Tensor:
        order = torch.randperm(len(updates), generator=seeded_generator(self.server.seed, round_, BUCKET_STREAM))
        return bucket_means(updates, self.params.bucket_size, order.to(updates.device))
