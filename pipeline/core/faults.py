"""Faulty users: the client-side injection (to test the server) and the
server's guards against them, as pure tensor functions.

Client side, :func:`inject_faults` corrupts what the users of the config's
``faults`` section send, after the protocol's masking (a faulty client does
not follow the protocol): NaN or Inf in a random half of the uploaded values,
nothing at all (dropout), or the whole update times ``huge_scale``.

Server side, :func:`screen_uploads` knows nothing of that config. It reads
the uploads as they come, NaN meaning "not uploaded" (DSSGD's masking sends
only a fraction of the values), and for the round:

- leaves out every user with an infinite value (a float overflow or a broken
  client: no value of that upload can be trusted);
- leaves out every user whose update's RMS over the values it uploaded exceeds
  ``max_norm_ratio`` times the median RMS of the users (the lower median for an
  even count), a user-robust statistic: a minority of huge updates cannot move it;
- counts users that uploaded nothing (dropped out) and users that uploaded
  fewer values than the protocol's quota (some NaN values): their missing
  values are simply absent from the per-coordinate mean.

The guard runs before the defense: a left-out user's row is all NaN in what
the defense sees, i.e. absent for that round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.lazy import torch

from pipeline.core.errors import check, positive

FAULT_KINDS = ("nan_users", "inf_users", "dropout_users", "huge_users")


@dataclass
class FaultsConfig:
    """Faulty users, injected on the client side to test the server's
    robustness (defaults: nobody misbehaves), and the server's norm guard.

    The server never reads the fault lists: it treats NaN as "not uploaded",
    leaves out for the round any user with an Inf value or an update whose
    RMS exceeds ``max_norm_ratio`` times the median (see :mod:`pipeline.core.faults`).
    """

    nan_users: list[int] = field(default_factory=list)  # a random half of their uploaded values are NaN
    inf_users: list[int] = field(default_factory=list)  # a random half of their uploaded values are +-Inf
    dropout_users: list[int] = field(default_factory=list)  # upload nothing
    huge_users: list[int] = field(default_factory=list)  # their update is multiplied by huge_scale
    huge_scale: float = 1e6
    rounds: list[int] = field(default_factory=list)  # the rounds they misbehave in; empty: every round
    # server side: leave out a user whose update's RMS exceeds this times the median RMS; .inf: no guard
    max_norm_ratio: float = 100.0

    def validate(self, num_users: int, rounds: int) -> None:
        """The user ids within ``num_users`` (one fault kind each), the rounds within ``rounds``."""
        kind_of: dict[int, str] = {}
        for kind in FAULT_KINDS:
            ids = getattr(self, kind)
            check(all(0 <= i < num_users for i in ids), f"faults.{kind}",
                  f"must be user ids in [0, users.num_users={num_users})", ids)
            for i in ids:
                check(i not in kind_of, f"faults.{kind}",
                      f"user {i} is already in faults.{kind_of.get(i)} (one fault kind per user)", ids)
                kind_of[i] = kind
        check(all(1 <= r <= rounds for r in self.rounds), "faults.rounds",
              f"must be rounds in [1, training.rounds={rounds}] (empty: every round)", self.rounds)
        check(positive(self.huge_scale), "faults.huge_scale", "must be a finite number > 0", self.huge_scale)
        check(self.max_norm_ratio > 1, "faults.max_norm_ratio", "must be > 1 (.inf: no norm guard)",
              self.max_norm_ratio)


# the faults' random stream in a round, apart from the protocol's (2**32 - 1) and every user's batch stream
FAULT_STREAM = 2**32 - 2


def faulty_this_round(faults: FaultsConfig, round_: int) -> bool:
    """Whether any user misbehaves in ``round_``."""
    anyone = faults.nan_users or faults.inf_users or faults.dropout_users or faults.huge_users
    return bool(anyone) and (not faults.rounds or round_ in faults.rounds)


def inject_faults(uploads: torch.Tensor, faults: FaultsConfig, round_: int, generator: torch.Generator,
                  user_ids: list[int] | None = None) -> torch.Tensor:
    """Client side: what the users send in ``round_``, with the configured faults
    applied to the server's view ``uploads`` (users, P; NaN: not uploaded); row ``i`` is user
    ``user_ids[i]`` (default: user ``i``), and a faulty user absent from the round does nothing.
    Returns ``uploads`` itself when nobody misbehaves in this round."""
    if not faulty_this_round(faults, round_):
        return uploads
    sent = uploads.clone()
    row = {u: i for i, u in enumerate(range(len(uploads)) if user_ids is None else user_ids)}
    # drawn with the CPU generator, then moved: the same faults on every device
    half = (torch.rand(uploads.shape, generator=generator) < 0.5).to(uploads.device)  # what NaN / Inf corrupts
    sign = torch.where(torch.rand(uploads.shape, generator=generator) < 0.5, -1.0, 1.0).to(uploads.device)
    for user in (row[u] for u in faults.nan_users if u in row):
        sent[user] = torch.where(half[user], torch.nan, sent[user])
    for user in (row[u] for u in faults.inf_users if u in row):
        sent[user] = torch.where(half[user] & ~torch.isnan(sent[user]), sign[user] * torch.inf, sent[user])
    for user in (row[u] for u in faults.dropout_users if u in row):
        sent[user] = torch.nan
    for user in (row[u] for u in faults.huge_users if u in row):
        sent[user] = sent[user] * faults.huge_scale
    return sent


@dataclass(frozen=True)
class Screening:
    """What :func:`screen_uploads` found in one round; masks are bool (users,)."""

    updates: torch.Tensor  # the uploads, faulty users' rows all NaN (the input itself when nobody is faulty)
    infinite: torch.Tensor  # left out: an infinite value
    outlier: torch.Tensor  # left out: update RMS above max_norm_ratio x the median RMS
    dropped: torch.Tensor  # uploaded nothing
    incomplete: torch.Tensor  # uploaded some values, fewer than the protocol's quota

    @property
    def faulty(self) -> torch.Tensor:
        """The users left out of this round."""
        return self.infinite | self.outlier


def update_rms(updates: torch.Tensor) -> torch.Tensor:
    """Each user's root mean square over the finite values it uploaded (float64; 0 when none)."""
    finite = torch.isfinite(updates)
    squares = torch.where(finite, updates, 0).square().sum(1, dtype=torch.float64)
    return (squares / finite.sum(1).clamp(min=1)).sqrt()


def screen_uploads(updates: torch.Tensor, expected: int, max_norm_ratio: float) -> Screening:
    """Server side: find the users to leave out of this round, and the dropouts.

    Parameters
    ----------
    updates : (users, P) tensor, NaN where a user uploaded nothing.
    expected : int
        How many values each user uploads under the protocol (``num_kept(theta_u, P)``).
    max_norm_ratio : float
        Leave out a user whose update RMS exceeds this times the median RMS; ``inf``: never.

    Examples
    --------
    >>> u = torch.tensor([[0.1, -0.1], [0.2, 0.1], [float("inf"), 0.1], [1e6, 1e6], [float("nan")] * 2])
    >>> s = screen_uploads(u, expected=2, max_norm_ratio=100)
    >>> s.infinite.tolist(), s.outlier.tolist(), s.dropped.tolist()
    ([False, False, True, False, False], [False, False, False, True, False], [False, False, False, False, True])
    """
    # one pass for the common round, every value finite: the norms are then finite (a NaN or Inf makes its row's
    # norm non-finite, and so does a float32 overflow: those rounds take the exact path below), and the RMS is
    # the norm over sqrt(P) (float32's rounding, 20x faster than a float64 pass; it can only matter to a user
    # whose RMS lies within 1e-6 of the bound)
    norms = torch.linalg.vector_norm(updates, dim=1)
    if bool(torch.isfinite(norms).all()):
        count = torch.full((len(updates),), updates.shape[1], device=updates.device)
        dropped = infinite = torch.zeros(len(updates), dtype=torch.bool, device=updates.device)
        rms = norms.double() / math.sqrt(max(updates.shape[1], 1))
    else:
        count = (~torch.isnan(updates)).sum(1)
        dropped = count == 0
        infinite = torch.isinf(updates).any(1)
        rms = None
    outlier = torch.zeros_like(dropped)
    candidates = ~dropped & ~infinite
    if not math.isinf(max_norm_ratio) and candidates.any():
        rms = update_rms(updates) if rms is None else rms
        median = rms[candidates].median()  # the lower median for an even count
        if median > 0:
            outlier = candidates & (rms > max_norm_ratio * median)
    faulty = infinite | outlier
    if faulty.any():
        updates = updates.masked_fill(faulty.unsqueeze(1), torch.nan)
    return Screening(updates, infinite, outlier, dropped, (count > 0) & (count < expected))
