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


PARTITION_DRAWS = 100  # Dirichlet draws tried before a partition is refused


def dirichlet_partition(
    labels: np.ndarray, num_users: int, concentration: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Non-IID split: for every class, its samples are shuffled and cut among
    the users with proportions drawn from Dirichlet(``concentration``, ..., ``concentration``).

    Small concentrations (e.g. 0.1) give each user few classes; large ones
    (e.g. 1000) give near-IID shares. Every index lands in exactly one part;
    parts are sorted. A draw that leaves some user fewer than ``min_samples``
    samples is drawn again from ``rng`` (as the field's partitioners do), so a
    first draw that passes is the partition; raises ``ValueError`` when none of
    :data:`PARTITION_DRAWS` draws passes.
    """
    if num_users < 1 or concentration <= 0:
        raise ValueError(f"need num_users >= 1 and concentration > 0, got {num_users}, {concentration}")
    fewest = 0
    for _ in range(PARTITION_DRAWS):
        parts = [[np.empty(0, dtype=np.intp)] for _ in range(num_users)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_users, concentration))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for user, chunk in enumerate(np.split(members, cuts)):
                parts[user].append(chunk)
        result = [np.sort(np.concatenate(chunks)) for chunks in parts]
        fewest = max(fewest, min(len(part) for part in result))
        if fewest >= min_samples:
            return result
    raise ValueError(
        f"dirichlet_partition: each of {PARTITION_DRAWS} draws left a user fewer than min_samples={min_samples} "
        f"samples (at best {fewest}); raise the concentration or lower the number of users"
    )
