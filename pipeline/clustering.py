"""Exact 2-means in one dimension, for many features at once.

In 1-D the optimal 2-means partition is a split of the sorted values: the
lower cluster is the ``k`` smallest values. Minimising the within-cluster sum
of squares is the same as maximising ``S_k^2 / k + (T - S_k)^2 / (n - k)``
(``S_k`` the sum of the ``k`` smallest, ``T`` the total), which prefix sums
give for every ``k`` at once. This is exact, unlike Lloyd's iterations, and
vectorises over features; scikit-learn's ``KMeans`` is the test reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TwoMeans(NamedTuple):
    upper: torch.Tensor  # (features, users) bool: the value is in the upper cluster
    low: torch.Tensor  # (features,) centre of the lower cluster (NaN: fewer than 2 values)
    high: torch.Tensor  # (features,) centre of the upper cluster (NaN: fewer than 2 values)


def two_means_1d(values: torch.Tensor, chunk_size: int = 32768) -> TwoMeans:
    """Cluster each row of ``values`` (``features x users``) into two groups.

    NaN marks a missing value (a user that did not upload that feature): it is
    in neither cluster, and the row is clustered over its present values only.
    Rows are processed ``chunk_size`` at a time so that peak memory stays bounded.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (features x users), got shape {tuple(values.shape)}")
    num_features, num_users = values.shape
    upper = torch.zeros(num_features, num_users, dtype=torch.bool)
    low = torch.full((num_features,), float("nan"))
    high = torch.full((num_features,), float("nan"))
    sizes = torch.arange(1, num_users + 1, dtype=torch.float64)  # k = size of the lower cluster
    for start in range(0, num_features, chunk_size):
        chunk = values[start : start + chunk_size].to(torch.float64)
        ordered, order = torch.sort(chunk, dim=1)  # NaN sorts last
        present = (~torch.isnan(ordered)).sum(1, keepdim=True)  # (c, 1)
        prefix = torch.nan_to_num(ordered, nan=0.0).cumsum(1)
        total = prefix[:, -1:]
        rest = present - sizes
        score = prefix**2 / sizes + (total - prefix) ** 2 / rest.clamp(min=1)
        score[(rest < 1) | (sizes > present)] = -torch.inf
        k = score.argmax(1, keepdim=True) + 1  # (c, 1)
        ok = present.squeeze(1) >= 2
        lo = prefix.gather(1, k - 1) / k
        hi = (total - prefix.gather(1, k - 1)) / (present - k).clamp(min=1)
        end = start + len(chunk)
        low[start:end] = torch.where(ok, lo.squeeze(1), torch.nan).float()
        high[start:end] = torch.where(ok, hi.squeeze(1), torch.nan).float()
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(num_users).expand_as(order))
        upper[start:end] = (rank >= k) & (rank < present) & ok.unsqueeze(1)
    return TwoMeans(upper, low, high)
