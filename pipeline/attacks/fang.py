"""Fang's full-knowledge attacks (Fang, Cao, Jia & Gong, "Local model poisoning attacks to
Byzantine-robust federated learning", USENIX Security 2020, Sections 3.3-3.4).

The attack is built against one aggregation rule (``target``) and sees the honest updates ``h_i``
of the round (full knowledge). ``s`` is the direction the global model would move without the
attack, the sign of the honest updates' mean per coordinate; the attackers push against it.
With ``m`` users in the round, ``c`` of them attackers, and ``d`` parameters:

- ``target: krum``: every attacker uploads ``-lambda * s``. ``lambda`` starts at the paper's
  upper bound (its Theorem 1, in update space, where the current global model ``w_Re`` is the
  update 0)::

      lambda_0 = min_i sum_{l in G_i} ||h_l - h_i|| / ((m - 2c - 1) sqrt(d)) + max_i ||h_i|| / sqrt(d)

  (``G_i``: the ``m - c - 2`` honest updates nearest ``h_i``), and is halved until Krum, run over
  the honest updates and the ``c`` crafted copies with ``f = c``
  (:func:`pipeline.defenses.krum.multi_krum_select`, our Krum's ``n - f - 2`` neighbours), selects
  a crafted one, or until it falls below ``min_lambda`` (the paper's threshold, 1e-5); then that
  last value is uploaded.
- ``target: trimmed_mean`` (the paper's attack on trimmed mean, and on median): per coordinate
  ``j``, with ``w_max,j`` / ``w_min,j`` the honest updates' largest / smallest value, each
  attacker's value is drawn uniformly from ``[w_min,j / b, w_min,j]`` (``w_min,j > 0``) or
  ``[b w_min,j, w_min,j]`` (else) where ``s_j = 1``, from ``[w_max,j, b w_max,j]``
  (``w_max,j > 0``) or ``[w_max,j, w_max,j / b]`` (else) where ``s_j = -1``: past the honest
  extreme on the side opposite to the honest direction; the honest mean where ``s_j = 0``. Each
  attacker its own draw, from a generator keyed by (run seed, round) apart from every other
  stream: the same draws on every device and after a resume.

Where we had to choose, or deviate from the paper:

- Update space. The paper crafts local models; the server here adds the aggregate of updates, so
  its ``w_Re`` is the update 0 and a crafted model ``w_Re - lambda s`` is the update ``-lambda s``
  (the Krum attack is the same). For the trimmed-mean attack the factor ``b`` therefore scales the
  honest extreme's *movement* from the global model, not the parameter's value: the interval's
  width follows how far the honest users move that parameter, not how large the parameter is.
- ``s`` is the sign of the honest mean (our reading of the paper's "changing direction" of a
  parameter without attack: where plain averaging of the honest updates would move it), not the sign
  of the attacked rule's own aggregate of them.
- The paper samples the other ``c - 1`` crafted models within a small ``epsilon`` of the first;
  every attacker uploads the same ``-lambda * s`` (``epsilon = 0``, which gives the crafted update
  the lowest Krum score).
- The bound is undefined when ``m - 2c - 1 <= 0``: the ``c - 1`` copies then fill the crafted
  update's Krum neighbourhood (score 0, selected at any ``lambda``); we divide by 1 there. With
  fewer than 3 honest updates Krum with ``f = c`` has no neighbour to score: no halving,
  ``lambda = lambda_0``. A tie between a crafted and an honest score goes to the honest one (the
  honest rows come first, Krum keeps the lower row): only a strict win counts as selected.
- The server's norm guard (``faults.max_norm_ratio``, 100x the median RMS) never leaves a crafted
  update out on digits: ``lambda_0`` is 2-2.4x the honest median RMS and the trimmed-mean uploads' RMS
  at most 1.02x (10 rounds, measured).

The Krum attack needs honest updates that disagree: the crafted copies win only when their distances
to the nearest honest updates beat the honest updates' distances to each other. On digits with the
default batch size 16 the honest updates' mean cosine is 0.60-0.83 and on seed 0 no ``lambda > 0``
wins: ``lambda`` falls below ``min_lambda`` and Krum leaves the near-zero copies out (accuracy 0.689,
Krum without attackers 0.747, benign 0.804: Krum picks among 7 honest updates, with the copies as
their neighbours, instead of 10); on seed 2 Krum picks them in every round (0.053). With batch size 32 (cosine 0.44-0.64) it
picks them in 9 of 10 rounds on seed 0: 0.127 against 0.702 for Krum without attackers (benign 0.789).

Omniscient and untargeted: success is the accuracy drop.

Parameters (``attack.fang``): ``target`` (krum | trimmed_mean, the rule attacked, default krum),
``b`` (trimmed_mean: the interval's factor, >= 1, default 2, the paper's), ``min_lambda`` (krum: stop
halving below this, default 1e-5, the paper's threshold). A search (``auror tune --kind attack``,
``auror worst-case``) after trial 0 (the configured attack) covers the trimmed-mean attack's ``b``, and the
krum attack when the config attacks trimmed mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import ACCURACY_DROP, Attack, AttackParams, RoundUpdates, check, everyone_uploads, \
    finite_number
from pipeline.core.device import seeded_generator
from pipeline.defenses.krum import multi_krum_select, neighbour_scores, pairwise_sq_distances

FANG_STREAM = 2**32 - 9  # the trimmed-mean attack's draws, apart from the users', the sampler's and the defenses'
TARGETS = ("krum", "trimmed_mean")


def honest_direction(honest: torch.Tensor) -> torch.Tensor:
    """``s``: the sign of the honest updates' mean per coordinate (P,), where the model would move."""
    return torch.sign(honest.mean(0))


def krum_lambda_bound(honest: torch.Tensor, num_users: int, attackers: int) -> float:
    """The paper's upper bound on ``lambda`` (Theorem 1) from the honest updates (h, P), ``m = num_users``
    and ``c = attackers``; the update 0 is the global model."""
    h, d = honest.shape
    dist = pairwise_sq_distances(honest).sqrt()  # Euclidean, as the theorem (not Krum's squares)
    k = min(num_users - attackers - 2, h - 1)  # |G_i| = m - c - 2 honest neighbours (fewer if fewer are there)
    spread = float(neighbour_scores(dist, k).min()) if k >= 1 else 0.0
    reach = float(honest.double().norm(dim=1).max())
    return spread / (max(num_users - 2 * attackers - 1, 1) * math.sqrt(d)) + reach / math.sqrt(d)


def krum_crafted_is_selected(honest: torch.Tensor, crafted: torch.Tensor, attackers: int) -> bool:
    """Krum over the honest rows then ``attackers`` copies of ``crafted``, with ``f = attackers``, picks a copy."""
    rows = torch.cat([honest, crafted.expand(attackers, -1)])
    return int(multi_krum_select(rows, attackers, 1)[0]) >= len(honest)


def fang_krum_update(honest: torch.Tensor, num_users: int, attackers: int, min_lambda: float
                     ) -> tuple[torch.Tensor, float]:
    """The crafted update ``-lambda * s`` (P,) and its ``lambda``: from the bound, halved until Krum selects it
    or ``lambda < min_lambda``."""
    s = honest_direction(honest)
    lam = krum_lambda_bound(honest, num_users, attackers)
    if len(honest) < 3:  # Krum with f = c scores no row: nothing to check
        return -lam * s, lam
    while lam >= min_lambda and not krum_crafted_is_selected(honest, -lam * s, attackers):
        lam /= 2
    return -lam * s, lam


def trim_intervals(honest: torch.Tensor, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the ``(low, high)`` (each (P,)) each attacker's value is drawn from: past the honest
    minimum where ``s = 1``, past the maximum where ``s = -1``, by up to a factor ``b``; the mean where ``s = 0``."""
    mean = honest.mean(0)
    s = torch.sign(mean)
    w_max, w_min = honest.amax(0), honest.amin(0)
    # s = 1: below the honest minimum, towards b * w_min (or w_min / b when w_min > 0, staying above 0)
    up_low, up_high = torch.where(w_min > 0, w_min / b, w_min * b), w_min
    # s = -1: above the honest maximum, mirrored
    down_low, down_high = w_max, torch.where(w_max > 0, w_max * b, w_max / b)
    low = torch.where(s > 0, up_low, torch.where(s < 0, down_low, mean))
    high = torch.where(s > 0, up_high, torch.where(s < 0, down_high, mean))
    return low, high


def fang_trim_uploads(honest: torch.Tensor, attackers: int, b: float, generator: torch.Generator) -> torch.Tensor:
    """``(attackers, P)`` uniform draws in :func:`trim_intervals`, one attacker's row after the other; drawn on the
    CPU (the same on every device), then moved to ``honest``'s device and dtype."""
    low, high = trim_intervals(honest, b)
    u = torch.rand((attackers, honest.shape[1]), generator=generator, dtype=torch.float64)
    u = u.to(device=honest.device, dtype=honest.dtype)
    return low + u * (high - low)


@dataclass
class FangParams(AttackParams):
    target: str = "krum"  # krum | trimmed_mean (also the paper's attack on median)
    b: float = 2.0  # trimmed_mean: values up to b times past the honest extreme
    min_lambda: float = 1e-5  # krum: lambda is halved until Krum picks the crafted update or it falls below this

    def validate(self, key: str) -> None:
        check(self.target in TARGETS, f"{key}.target", f"must be one of {', '.join(TARGETS)}", self.target)
        check(finite_number(self.b) and self.b >= 1, f"{key}.b", "must be a finite number >= 1", self.b)
        check(finite_number(self.min_lambda) and self.min_lambda > 0, f"{key}.min_lambda",
              "must be a finite number > 0", self.min_lambda)


@register
class Fang(Attack):
    """Omniscient and untargeted: crafted against Krum (the largest reversal Krum still picks) or trimmed mean
    (values past the honest extremes, against the honest direction)."""

    name = "fang"
    summary = ("Fang et al. (USENIX Security 2020), full knowledge: against krum (-lambda x sign of the honest mean) "
               "or trimmed_mean / median (past the honest extremes)")
    Params = FangParams
    omniscient = True
    trains_maliciously = False
    success_metric = ACCURACY_DROP
    # and target (search_space): b shapes the trimmed_mean attack only; the krum attack's lambda is solved for
    search_ranges = {"attack.fang.b": (1.1, 10.0, True, False)}

    @classmethod
    def search_space(cls, trial, cfg) -> list[str]:
        """The trimmed-mean attack's ``b``, and the krum attack (no knob: one setting) unless the config attacks
        Krum already, as a study's trial 0 then runs it: a search of ``b`` under krum would repeat trial 0."""
        targets = [t for t in TARGETS if t != "krum" or cfg.attack.fang.target != "krum"]
        target = trial.suggest_categorical("attack.fang.target", targets) if len(targets) > 1 else targets[0]
        if target == "krum":
            return [f"attack.fang.target={target}"]
        return [f"attack.fang.target={target}", *super().search_space(trial, cfg)]

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        honest, attackers = updates.honest, updates.own.shape[0]
        if self.params.target == "krum":
            crafted, _ = fang_krum_update(honest, updates.num_users, attackers, self.params.min_lambda)
            return everyone_uploads(crafted, updates.own)
        generator = seeded_generator(updates.seed, updates.round, FANG_STREAM)
        return fang_trim_uploads(honest, attackers, self.params.b, generator).to(updates.own.dtype)
