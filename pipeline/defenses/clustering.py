"""Exact 2-means in one dimension, for many features at once.

In 1-D the optimal 2-means partition is a split of the sorted values: the
lower cluster is the ``k`` smallest values. Minimising the within-cluster sum
of squares is the same as maximising the between-cluster sum of squares
``p / (k (p - k)) * (S_k - k T / p)^2`` (``S_k`` the sum of the ``k``
smallest, ``T`` the total, ``p`` the number of values), which prefix sums
give for every ``k`` at once. This is exact, unlike Lloyd's iterations, and
vectorises over features; scikit-learn's ``KMeans`` is the test reference.

What makes it fast (``benchmarks/bench_clustering.py`` measures it):

- only the sorted *values* are needed, never the sort permutation: a value is
  in the upper cluster when it is above the largest value of the lower
  cluster. Rows where that value equals the smallest upper one (an optimal
  split never cuts a run of equal values unless the row is constant, but
  rounding may) fall back to ranks from a stable sort, so the upper cluster
  always holds exactly the ``p - k`` values the centres were computed from;
- the sort runs in the input's precision (``float32`` sorts exactly like its
  ``float64`` image); only prefix sums and scores use ``float64``, with the
  scores centred on the row mean (fewer operations, less cancellation);
- on CPU, rows are sorted by NumPy, whose SIMD sort handles many short rows
  an order of magnitude faster than ``torch.sort``, and each chunk runs
  single-threaded in NumPy, chunks spread over a small thread pool: no
  OpenMP barrier per operation, which on a shared 2-core machine made
  ``torch`` elementwise ops several times slower;
- rows are processed ``chunk_size`` at a time, so the ``float64``
  intermediates stay cache-sized and the peak extra memory is the outputs
  (a bool per value) plus a few chunks.

On other devices (CUDA) the same steps run in ``torch`` on the device.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from pipeline.lazy import torch


class TwoMeans(NamedTuple):
    upper: torch.Tensor  # (features, users) bool: the value is in the upper cluster
    low: torch.Tensor  # (features,) centre of the lower cluster (NaN: fewer than 2 values)
    high: torch.Tensor  # (features,) centre of the upper cluster (NaN: fewer than 2 values)


def _chunk_numpy(x: np.ndarray, upper: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    """Cluster the rows of ``x`` (``c x users``, contiguous) into the given output slices."""
    num_users = x.shape[1]
    sizes = np.arange(1, num_users, dtype=np.float64)  # k = size of the lower cluster
    ordered = np.sort(x, axis=1)  # NaN last
    prefix = ordered.astype(np.float64)
    np.cumsum(prefix, axis=1, out=prefix)  # S_k; NaN from the first missing value on
    missing = bool(np.isnan(ordered[:, -1]).any())
    if missing:
        present = num_users - np.isnan(ordered).sum(1, keepdims=True)  # (c, 1)
        total = np.take_along_axis(prefix, np.maximum(present - 1, 0), 1)
        with np.errstate(divide="ignore"):
            weight = 1.0 / (sizes * (present - sizes))  # inf / negative where k >= p: masked below
    else:
        present = np.full((len(x), 1), num_users)
        total, weight = prefix[:, -1:], 1.0 / (sizes * (num_users - sizes))
    with np.errstate(invalid="ignore"):  # NaN prefixes past the present values
        score = prefix[:, :-1] - sizes * (total / present)
        np.square(score, out=score)
        score *= weight
    if missing:
        score[sizes >= present] = -np.inf
    k = score.argmax(1)[:, None] + 1  # (c, 1)
    ok = present >= 2
    lower_sum = np.take_along_axis(prefix, k - 1, 1)
    low[:] = np.where(ok, lower_sum / k, np.nan)[:, 0]
    high[:] = np.where(ok, (total - lower_sum) / np.maximum(present - k, 1), np.nan)[:, 0]
    last_lower = np.take_along_axis(ordered, k - 1, 1)
    with np.errstate(invalid="ignore"):
        np.greater(x, last_lower, out=upper)  # NaN compares False: missing values stay out
    upper &= ok
    tied = ((last_lower == np.take_along_axis(ordered, k, 1)) & ok)[:, 0]
    if tied.any():  # ranks from a stable sort: among equal values, earlier users are lower
        rank = np.argsort(np.argsort(x[tied], axis=1, kind="stable"), axis=1, kind="stable")
        upper[tied] = (rank >= k[tied]) & (rank < present[tied])


def _chunk_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_chunk_numpy`` in ``torch`` (for CUDA and other devices): returns ``upper, low, high``."""
    num_users = x.shape[1]
    sizes = torch.arange(1, num_users, dtype=torch.float64, device=x.device)
    ordered = torch.sort(x, dim=1).values  # NaN last
    prefix = torch.cumsum(ordered, 1, dtype=torch.float64)
    missing = bool(torch.isnan(ordered[:, -1]).any())
    if missing:
        present = num_users - torch.isnan(ordered).sum(1, keepdim=True)
        total = prefix.gather(1, (present - 1).clamp(min=0))
        weight = 1.0 / (sizes * (present - sizes))
    else:
        present = torch.full((len(x), 1), num_users, device=x.device)
        total, weight = prefix[:, -1:], 1.0 / (sizes * (num_users - sizes))
    score = prefix[:, :-1] - sizes * (total / present)
    score.square_().mul_(weight)
    if missing:
        score.masked_fill_(sizes >= present, -torch.inf)
    k = score.argmax(1, keepdim=True) + 1
    ok = present >= 2
    lower_sum = prefix.gather(1, k - 1)
    low = torch.where(ok, lower_sum / k, torch.nan)[:, 0]
    high = torch.where(ok, (total - lower_sum) / (present - k).clamp(min=1), torch.nan)[:, 0]
    last_lower = ordered.gather(1, k - 1)
    upper = (x > last_lower) & ok
    tied = ((last_lower == ordered.gather(1, k)) & ok)[:, 0]
    if tied.any():
        rank = torch.sort(x[tied], dim=1, stable=True).indices.argsort(dim=1, stable=True)
        upper[tied] = (rank >= k[tied]) & (rank < present[tied])
    return upper, low, high


def two_means_1d(values: torch.Tensor, chunk_size: int = 4096, *, num_threads: int | None = None) -> TwoMeans:
    """Cluster each row of ``values`` (``features x users``) into two groups.

    NaN marks a missing value (a user that did not upload that feature): it is
    in neither cluster, and the row is clustered over its present values only.
    Rows are processed ``chunk_size`` at a time so that peak memory stays bounded.
    On CPU, chunks run on up to ``num_threads`` threads (default:
    ``torch.get_num_threads()``); the result does not depend on either.
    The results are on ``values``' device.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (features x users), got shape {tuple(values.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
    num_features, num_users = values.shape
    device = values.device
    sort_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32  # both sort exactly
    upper = torch.zeros(num_features, num_users, dtype=torch.bool, device=device)
    low = torch.full((num_features,), float("nan"), device=device)
    high = torch.full((num_features,), float("nan"), device=device)
    if num_users < 2 or num_features == 0:
        return TwoMeans(upper, low, high)
    starts = range(0, num_features, chunk_size)

    if device.type != "cpu":
        for start in starts:
            up, lo, hi = _chunk_torch(values[start : start + chunk_size].to(sort_dtype))
            upper[start : start + chunk_size], low[start : start + chunk_size] = up, lo.to(low.dtype)
            high[start : start + chunk_size] = hi.to(high.dtype)
        return TwoMeans(upper, low, high)

    source = values.detach()
    source = (source if source.dtype == sort_dtype else source.to(sort_dtype)).numpy()  # a view when possible
    upper_np, low_np, high_np = upper.numpy(), low.numpy(), high.numpy()

    def run(start: int) -> None:
        end = start + chunk_size
        chunk = np.ascontiguousarray(source[start:end])
        _chunk_numpy(chunk, upper_np[start:end], low_np[start:end], high_np[start:end])

    workers = min(num_threads or torch.get_num_threads(), len(starts))
    if workers <= 1:
        for start in starts:
            run(start)
    else:  # NumPy releases the GIL in its sorts and ufuncs; chunks write disjoint slices
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))
    return TwoMeans(upper, low, high)
