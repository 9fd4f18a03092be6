"""Robust learning rate (Ozdayi, Kantarcioglu & Gel, "Defending against Backdoors in Federated Learning
with Robust Learning Rate", AAAI 2021).

Per coordinate ``j``, over the ``n`` users with a whole upload ``u_i``, the server's learning rate is
``-1`` when the users disagree on its sign, ``+1`` otherwise:

    rate_j = -1 if |sum_i sign(u_ij)| < theta else +1,        step = rate * mean_i u_i

(``sign(0) = 0``). A backdoor moves coordinates the honest users hardly agree on: there the step goes
against the average, undoing the attackers' push. The server's own learning rate (``server.lr``) then
multiplies the step, as the paper's ``eta``. Nobody is left out (DR and FPR are ``-``).

The threshold: the paper gives ``theta`` as a count of agents (4 of 10 on Fashion-MNIST, 8 of 40 on
CIFAR-10, in the authors' runner script), above the number of attackers and at most the number of honest
agents. Our rounds vary in size (``users.per_round``, absent users), and a fixed count would flip every
coordinate of a round with fewer users than it: ``threshold`` is a fraction of the round's usable users,
``theta = ceil(threshold * n)`` agents (1e-9 tolerance, so 0.28 of 25 is 7, not 8). The default 0.4 is the
paper's Fashion-MNIST setting, 4 of 10; 0: no coordinate flipped (the plain mean); 1: only the
coordinates every user agrees on keep their sign.

With no whole upload the step is zero. Partial (DSSGD-masked) uploads: refused (a sign count over a
varying set of users is not the paper's rule).

Parameters (``defense.rlr``): ``threshold`` in [0, 1] (default 0.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number


def agreement_threshold(threshold: float, n: int) -> int:
    """``theta = ceil(threshold * n)`` agents (1e-9 tolerance: 0.28 x 25 is 7.000000000000001 in floats, theta 7)."""
    return math.ceil(threshold * n - 1e-9)


def robust_rates(x: torch.Tensor, theta: int) -> torch.Tensor:
    """Per column of ``x`` (n, P): -1 where ``|sum_i sign(x_ij)| < theta``, else +1. (P,), ``x``'s dtype."""
    agreement = torch.sign(x).sum(0, dtype=torch.float64).abs()  # an exact count of signs
    return torch.where(agreement < theta, -1.0, 1.0).to(x.dtype)


def robust_learning_rate(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """RLR's step for the whole updates ``x`` (n >= 1, P): ``rate * mean``. (P,)."""
    return robust_rates(x, agreement_threshold(threshold, len(x))) * x.mean(0)


@dataclass
class RlrParams(DefenseParams):
    threshold: float = 0.4  # theta = ceil(threshold x round's users); less sign agreement: the mean reversed

    def validate(self, key: str) -> None:
        check(finite_number(self.threshold) and 0 <= self.threshold <= 1, f"{key}.threshold",
              "must be in [0, 1] (a fraction of the round's users)", self.threshold)


@register
class Rlr(Defense):
    """Reverse the mean on every coordinate whose sign too few users agree on; nobody is left out."""

    name = "rlr"
    summary = "robust learning rate (Ozdayi et al. 2021): reverse the mean where |sum of signs| < theta"
    Params = RlrParams
    search_ranges = {"threshold": (0.1, 0.9, False)}
    flags = "none"
    composable = True
    handles_missing = False

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        rows = complete_rows(updates)
        if not rows.any():
            return Aggregate(updates.new_zeros(updates.shape[1]))
        return Aggregate(robust_learning_rate(updates[rows], self.params.threshold))
