"""Shokri & Shmatikov's DSSGD protocol (CCS 2015) as pure tensor functions.

One round, per user: :func:`download_merge` (take a fraction θd of the global
parameters), local training, then the upload side: :func:`upload_mask` (keep a
fraction θu of the update values), :func:`clip` to [-γ, γ],
:func:`add_laplace_noise` with :func:`laplace_scale`, and :func:`mask_updates`
(what the server sees: NaN where nothing was uploaded). The server then
aggregates with :func:`aggregate_per_coordinate`.

Plain federated averaging is the special case θd = θu = 1, γ = ε = ∞: every
function then returns its input unchanged (bit for bit) and
:func:`aggregate_per_coordinate` equals the plain mean of the accepted updates.

Shapes: ``updates`` and ``local_params`` are (users, P); ``global_params`` is (P,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.lazy import torch

from pipeline.core.errors import check

UPLOAD_SELECTIONS = ("largest", "random")


@dataclass
class ProtocolConfig:
    """Shokri & Shmatikov's DSSGD; the defaults are plain federated averaging."""

    theta_d: float = 1.0  # fraction of the global parameters each user downloads
    theta_u: float = 1.0  # fraction of its update each user uploads
    upload_selection: str = "largest"  # largest | random
    gamma: float = float("inf")  # uploaded values are clipped to [-gamma, gamma]
    epsilon: float = float("inf")  # privacy budget per round and user; inf: no noise

    def validate(self) -> None:
        for name in ("theta_d", "theta_u"):
            check(0 < getattr(self, name) <= 1, f"protocol.{name}", "must be in (0, 1]", getattr(self, name))
        check(self.upload_selection in UPLOAD_SELECTIONS, "protocol.upload_selection",
              f"must be one of {', '.join(UPLOAD_SELECTIONS)}", self.upload_selection)
        check(self.gamma > 0, "protocol.gamma", "must be > 0 (.inf: no clipping)", self.gamma)
        check(self.epsilon > 0, "protocol.epsilon", "must be > 0 (.inf: no noise)", self.epsilon)
        check(self.epsilon == float("inf") or self.gamma < float("inf"), "protocol.gamma",
              "must be finite when protocol.epsilon is (the noise is calibrated to the clipping bound)", self.gamma)


def num_kept(fraction: float, num_params: int) -> int:
    """How many of ``num_params`` coordinates a user uploads: all when
    ``fraction == 1``, else ``max(1, round(fraction * num_params))``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"upload fraction must be in (0, 1], got {fraction}")
    return num_params if fraction == 1 else max(1, round(fraction * num_params))


def _first_k(order: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask, True at the first ``k`` columns of each row of ``order``."""
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return mask.scatter_(1, order[:, :k], True)


def _random_mask(shape: tuple[int, int], k: int, generator: torch.Generator) -> torch.Tensor:
    """Each row: exactly ``k`` of its columns, a uniformly random subset drawn with ``generator``."""
    return _first_k(torch.rand(shape, generator=generator).argsort(dim=1), k)


def upload_mask(
    updates: torch.Tensor,
    fraction: float,
    mode: Literal["largest", "random"],
    generator: torch.Generator,
) -> torch.Tensor:
    """Which coordinates each user uploads: a bool (users, P) mask with exactly
    :func:`num_kept` ``(fraction, P)`` True values per row.

    ``"largest"``: the largest ``|update|`` values; ties go to the lower index
    (stable sort), so the result is deterministic and ``generator`` is unused.
    ``"random"``: a uniformly random subset per user, drawn with ``generator``.
    """
    users, num_params = updates.shape
    k = num_kept(fraction, num_params)
    if k == num_params:
        return torch.ones_like(updates, dtype=torch.bool)
    if mode == "largest":
        return _first_k(updates.abs().argsort(dim=1, descending=True, stable=True), k)
    if mode == "random":
        return _random_mask((users, num_params), k, generator).to(updates.device)
    raise ValueError(f"upload mode must be 'largest' or 'random', got {mode!r}")


def clip(updates: torch.Tensor, gamma: float) -> torch.Tensor:
    """Clip every value to [-γ, γ]; ``gamma = inf`` returns ``updates`` itself."""
    if gamma <= 0:
        raise ValueError(f"clipping bound gamma must be > 0, got {gamma}")
    return updates if math.isinf(gamma) else updates.clamp(-gamma, gamma)


def laplace_scale(gamma: float, epsilon: float, num_uploaded: int) -> float:
    """Laplace scale b for each uploaded value, given the per-round budget ε of one user.

    Calibration: each uploaded value is clipped to [-γ, γ], so changing it
    moves it by at most its sensitivity Δ = 2γ. The budget ε is split equally
    over the ``num_uploaded`` = c values the user uploads in the round (sequential
    composition), so each value gets Laplace noise of scale

        b = Δ / (ε / c) = 2γ · c / ε.

    This is the noise Shokri & Shmatikov add to the released values. Their full
    differentially private variant also spends part of ε on *choosing* which
    values to upload (a noisy threshold test); here the selection is
    :func:`upload_mask` (exact top-|value| or random), so the whole ε goes to
    the released values. ``epsilon = inf`` means no noise: scale 0.
    """
    if epsilon <= 0 or num_uploaded < 1:
        raise ValueError(f"need epsilon > 0 and num_uploaded >= 1, got {epsilon}, {num_uploaded}")
    if math.isinf(epsilon):
        return 0.0
    if math.isinf(gamma):
        raise ValueError("a finite privacy budget epsilon needs a finite clipping bound gamma")
    return 2 * gamma * num_uploaded / epsilon


def add_laplace_noise(values: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``values`` plus i.i.d. Laplace(0, ``scale``) noise drawn with ``generator``.

    Sampling: the difference of two independent Exp(1) variables is Laplace(0, 1);
    each Exp(1) is drawn by inverse CDF, ``-log(1 - U)`` with U uniform in [0, 1)
    (in float64, always finite). ``scale == 0`` returns ``values`` itself, untouched.
    """
    if scale < 0:
        raise ValueError(f"Laplace scale must be >= 0, got {scale}")
    if scale == 0:
        return values
    u = torch.rand((2, *values.shape), generator=generator, dtype=torch.float64)
    exp1 = -torch.log1p(-u)
    noise = scale * (exp1[0] - exp1[1])
    return values + noise.to(device=values.device, dtype=values.dtype)


def mask_updates(updates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The server's view: the uploaded values, NaN where nothing was uploaded
    (a missing value is not a zero)."""
    return torch.where(mask, updates, torch.nan)


def aggregate_per_coordinate(masked_updates: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """For each coordinate, the mean over the accepted users that uploaded it
    (non-NaN); 0 where no accepted user uploaded it. Shape (P,).

    Arithmetic: ``sum / count``, with the missing values replaced by exact zeros
    in the sum. That is how PyTorch computes ``mean(0)`` on CPU (sum, then divide
    by the row count), and adding exact zeros changes no partial sum, so with no
    NaN this equals ``updates[accepted].mean(0)`` bit for bit (no
    branching; ``tests/test_masking.py`` guards it on many shapes).
    """
    rows = masked_updates if bool(accepted.all()) else masked_updates[accepted]
    if len(rows) and not bool(torch.isnan(rows.sum())):  # whole uploads (a NaN would make the sum NaN):
        return rows.mean(0)  # the same numbers, fewer passes over the matrix
    uploaded = ~torch.isnan(rows)
    total = torch.where(uploaded, rows, 0).sum(0)
    count = uploaded.sum(0, dtype=rows.dtype)  # exact up to 2**24 users; no int64 copy of the mask
    return torch.where(count > 0, total / count, 0).to(masked_updates.dtype)


def download_merge(
    global_params: torch.Tensor,
    local_params: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DSSGD download: each user overwrites ``round(fraction * P)`` of its local
    parameters with the global values; the others stay local. Shape (users, P).

    Which ones: a uniformly random subset per user, drawn with ``generator``
    (one of Shokri & Shmatikov's two options; the other, the parameters most
    updated on the server, needs server state that this function does not take).
    ``fraction == 1`` returns ``global_params`` for every user, bit for bit.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"download fraction must be in [0, 1], got {fraction}")
    users, num_params = local_params.shape
    if fraction == 1:
        return global_params.expand(users, num_params).clone()
    replaced = _random_mask((users, num_params), round(fraction * num_params), generator)
    return torch.where(replaced.to(local_params.device), global_params, local_params)
