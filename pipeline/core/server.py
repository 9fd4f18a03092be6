"""What the server sees and decides in one round: the boundary between the
clients and any defense.

A defense receives :class:`Uploads` (user ids and update tensors, no data, no
labels, no knowledge of who attacks) and, when it declares them, the
server-held inputs of :class:`ServerInputs`; it returns an :class:`Aggregate`.
On the other side, an attack's update side sees :class:`RoundUpdates` before the upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.lazy import torch


@dataclass(frozen=True)
class RoundUpdates:
    """What an attack's update side sees in one round (before the upload)."""

    round: int
    own: torch.Tensor  # (attackers, P): the malicious users' updates after local training (and the boost)
    honest: torch.Tensor | None  # (honest users, P): the honest users' updates; None unless omniscient
    num_users: int  # every user of the round, honest and malicious
    seed: int = 0  # the run's seed, for attacks that draw random numbers
    # (P,): the previous round's global step, what the global model actually moved by (after the server's
    # optimiser; after a recovery, the step into the model it went back to); None in round 1, and unless the
    # attack declares needs_last_step
    last_step: torch.Tensor | None = None


@dataclass(frozen=True)
class Uploads:
    """What the server receives in one round, on the loop's device (a defense
    that keeps tensors across rounds must expect a CPU one after a resume).

    A row is all NaN for a user the server's guard left out this round or who
    uploaded nothing; with DSSGD masking (``protocol.theta_u < 1``) a row is
    NaN at every coordinate the user did not upload."""

    round: int
    user_ids: torch.Tensor  # (users,): ascending; under users.per_round the round's participants only
    updates: torch.Tensor  # (users, parameters): change of the local parameters; NaN where not uploaded


@dataclass(frozen=True)
class Aggregate:
    """A defense's decision for one round.

    ``step`` is added to the global parameters. ``weights`` is each user's
    share in the step (rows of the uploads, summing to 1 over the users that
    count; 0: left out), or ``None`` for a rule that weighs coordinates, not
    users (median, trimmed mean): such a rule excludes nobody.

    ``rewind_to``: a recovery. The step is discarded, the global model goes back to its state after
    that round (0: the initial model), and the rounds after it are trained again; the defense
    declares how far back it may ask in ``rewind_rounds``.
    """

    step: torch.Tensor  # (parameters,)
    weights: torch.Tensor | None = None  # (users,)
    rewind_to: int | None = None

    @property
    def excluded(self) -> torch.Tensor | None:
        """Users with no share in this round's step (bool (users,)), or ``None``."""
        return None if self.weights is None else self.weights <= 0


@dataclass(frozen=True)
class ParameterSlice:
    """Where one parameter tensor of the model lies in the flat update vector."""

    name: str  # e.g. "net.4.weight"
    start: int
    stop: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ServerInputs:
    """What the server holds besides the uploads; a defense declares what it reads.

    - ``layout``: the model's parameter tensors in the flat update vector
      (public: every user has the same architecture);
    - ``root_update(round)``: for defenses with ``needs_root_data`` (FLTrust):
      trains the current global model on the server's own small clean root set
      (without changing it) and returns the update, shape (parameters,);
    - ``seed``: the run's seed, for defenses that draw random numbers;
    - ``model_outputs(updates, x)``: for defenses that inspect the users' models (DeepSight): the class
      probabilities of the current global model moved by each row of ``updates`` (rows, P) on the inputs
      ``x`` (N, *input_shape), shape (rows, N, classes); a row of zeros is the global model itself;
    - ``input_shape``: one input's shape, for such a defense's probe inputs.
    """

    layout: tuple[ParameterSlice, ...]
    seed: int = 0
    root_update: Callable[[int], torch.Tensor] | None = None  # round -> the server's update on its root set
    model_outputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    input_shape: tuple[int, ...] = ()


def parameter_layout(module: torch.nn.Module) -> tuple[ParameterSlice, ...]:
    """The order :func:`torch.nn.utils.parameters_to_vector` flattens ``module``'s parameters in."""
    layout, start = [], 0
    for name, p in module.named_parameters():
        layout.append(ParameterSlice(name, start, start + p.numel(), tuple(p.shape)))
        start += p.numel()
    return tuple(layout)


def nan_rows(updates: torch.Tensor) -> torch.Tensor:
    """Rows that may hold a NaN (bool (users,)), from one sum per row: a NaN makes the sum NaN. (So do +inf
    and -inf together: such a row is only checked value by value below, never misjudged.)"""
    return torch.isnan(updates.sum(1))


def present_rows(updates: torch.Tensor) -> torch.Tensor:
    """Users who uploaded at least one value this round (bool (users,))."""
    present = torch.full((len(updates),), updates.shape[1] > 0, device=updates.device)
    suspect = nan_rows(updates).nonzero().squeeze(1)  # the others hold no NaN: present
    present[suspect] = ~torch.isnan(updates[suspect]).all(1)
    return present


def complete_rows(updates: torch.Tensor) -> torch.Tensor:
    """Users who uploaded every coordinate (bool (users,)): the only rows a
    rule on whole vectors (distances, norms, cosines) can use."""
    complete = ~nan_rows(updates)
    suspect = (~complete).nonzero().squeeze(1)
    complete[suspect] = ~torch.isnan(updates[suspect]).any(1)
    return complete


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i u_i / sum_i w_i`` over rows with ``w_i > 0`` (NaN rows must
    have weight 0); zeros when every weight is 0. Shape (parameters,)."""
    used = weights > 0
    if not used.any():
        return torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device)
    w = weights[used].to(updates.dtype)
    return (w @ updates[used]) / w.sum()
