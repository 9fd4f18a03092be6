"""Who takes part in a round: the cross-device setting, where the server samples users (FedAvg's C).

``users.per_round`` is a fraction in (0, 1] of ``users.num_users`` or a whole count; 1.0 (the default)
is everyone, the paper's cross-silo setting, and draws nothing. Each round's set comes from a
generator of its own, keyed by (seed, round): the same sets in every arm of a seed (the benign arm
included: the malicious users are chosen by the seed, attacking or not), and a resumed run draws
what it would have drawn.

``attack.participation``:

- ``sampled`` (default): the malicious users are drawn like everyone else; some rounds have no
  attacker, some more than their share;
- ``every_round``: every round holds the population's share of attackers,
  ``max(1, round(size x malicious / num_users))`` of them drawn among the malicious users and the
  rest among the honest ones (Sun et al. 2019's fixed-frequency attacker, at every round): the
  attack never misses a round.
"""

from __future__ import annotations

from pipeline.lazy import torch

from pipeline.core.device import seeded_generator

SAMPLE_STREAM = 2**32 - 5  # the sampler's stream, apart from every user's batch stream
PARTICIPATIONS = ("sampled", "every_round")


def round_size(per_round: float, num_users: int) -> int:
    """``users.per_round`` as a count: a fraction in (0, 1] of ``num_users`` (rounded, at least 1), or a
    count above 1 as it is."""
    return max(1, round(per_round * num_users)) if per_round <= 1 else int(per_round)


def sample_users(num_users: int, size: int, malicious: torch.Tensor, participation: str, seed: int,
                 round_: int) -> torch.Tensor:
    """The ascending ids (size,) of the users who take part in ``round_`` (all of them when
    ``size >= num_users``, drawing nothing)."""
    if size >= num_users:
        return torch.arange(num_users)
    g = seeded_generator(seed, round_, SAMPLE_STREAM)
    if participation == "sampled" or not malicious.any():
        return torch.randperm(num_users, generator=g)[:size].sort().values
    bad, good = malicious.nonzero().squeeze(1), (~malicious).nonzero().squeeze(1)
    attackers = min(len(bad), size, max(1, round(size * len(bad) / num_users)))
    chosen = torch.cat([bad[torch.randperm(len(bad), generator=g)[:attackers]],
                        good[torch.randperm(len(good), generator=g)[:size - attackers]]])
    return chosen.sort().values
