"""Splitting a training set among users, choosing the malicious ones, and
poisoning their data: pure functions over index arrays, seeded."""

from __future__ import annotations

import numpy as np


def iid_partition(num_samples: int, num_users: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the sample indices and deal them out in ``num_users`` near-equal parts.

    Every index lands in exactly one part; part sizes differ by at most one.
    """
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_users)]


def choose_malicious(num_users: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ``round(fraction * num_users)`` users drawn at random."""
    mask = np.zeros(num_users, dtype=bool)
    mask[rng.choice(num_users, size=round(fraction * num_users), replace=False)] = True
    return mask


def poison_targeted(
    labels: np.ndarray,
    user_indices: list[np.ndarray],
    malicious: np.ndarray,
    source: int,
    target: int,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Targeted label flipping: each malicious user relabels ``round(fraction * n)``
    of its ``n`` source-class samples, chosen at random, as ``target``.

    Returns the poisoned copy of ``labels`` and the boolean mask of relabelled samples.
    """
    poisoned = labels.copy()
    flipped = np.zeros(len(labels), dtype=bool)
    for user in np.flatnonzero(malicious):
        own_source = user_indices[user][labels[user_indices[user]] == source]
        chosen = rng.choice(own_source, size=round(fraction * len(own_source)), replace=False)
        poisoned[chosen] = target
        flipped[chosen] = True
    return poisoned, flipped
