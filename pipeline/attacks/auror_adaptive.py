"""A targeted attacker that knows AUROR (the evasion the AUROR paper discusses in Sec. 7).

AUROR flags a user who sits in the minority cluster of too many indicative
features: features whose 1-D 2-means centres lie more than ``alpha`` apart. This
attacker poisons like ``label_flip`` (source -> target, ``attack.poisoned_fraction``,
``attack.malicious_epochs``, boosted by ``attack.boost``), then, seeing the honest
updates of the round (omniscient), moves every coordinate of its update into
the honest users' spread: ``mean + clip(own - mean, -b, b)`` with
``b = spread * std`` of the honest updates (so no single feature separates it
from the honest users) and, when ``max_shift > 0``, ``b <= max_shift`` (its change
spread over many features, each below AUROR's ``alpha``). ``spread`` is the knob
of how close to the honest distribution it stays.

AUROR decides once, from the updates of its first ``window_rounds`` rounds.
``stealth_rounds > 0`` uses that: the attacker stays within the spread for
those rounds only and uploads its whole boosted update after them (0: within
the spread in every round). Against a defense that decides again every N
rounds (``auror_guard``'s ``redetect_every``) from the last ``window_rounds``,
``redetect_every = N`` makes the attacker stealthy in every evidence window
(rounds ``K + jN - K + 1 .. K + jN``, ``K = stealth_rounds``) and unbounded
only between them; with N <= K the windows tile the rounds and it is never
unbounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import AttackParams, RoundUpdates, check, finite_number, honest_spread
from pipeline.attacks.label_flip import LabelFlip


def within_spread(own: torch.Tensor, honest: torch.Tensor, spread: float, max_shift: float) -> torch.Tensor:
    """``own`` (attackers, P) clipped, coordinate by coordinate, to ``mean +- b`` of the honest updates,
    ``b = spread * std`` (and ``<= max_shift`` when it is > 0)."""
    mean, std = honest_spread(honest)
    bound = spread * std
    if max_shift > 0:
        bound = bound.clamp_max(max_shift)
    return mean + torch.minimum(torch.maximum(own - mean, -bound), bound)


@dataclass
class AurorAdaptiveParams(AttackParams):
    spread: float = 1.0  # how far from the honest mean, in honest standard deviations per coordinate
    max_shift: float = 0.0  # an absolute bound per coordinate as well (e.g. below AUROR's alpha); 0: none
    stealth_rounds: int = 3  # within the spread in rounds 1..stealth_rounds only (AUROR's window), unbounded after; 0: always
    redetect_every: int = 0  # the defense's re-detection period: within the spread in each of its windows; 0: once
    unkeyed_defaults: ClassVar[dict] = {"redetect_every": 0}

    def validate(self, key: str) -> None:
        check(finite_number(self.spread) and self.spread >= 0, f"{key}.spread", "must be a finite number >= 0",
              self.spread)
        check(finite_number(self.max_shift) and self.max_shift >= 0, f"{key}.max_shift",
              "must be a finite number >= 0 (0: no absolute bound)", self.max_shift)
        check(self.stealth_rounds >= 0, f"{key}.stealth_rounds", "must be >= 0 (0: every round)",
              self.stealth_rounds)
        check(isinstance(self.redetect_every, int) and self.redetect_every >= 0, f"{key}.redetect_every",
              "must be an integer >= 0 (0: the defense decides once)", self.redetect_every)


def stealthy(round_: int, window: int, every: int) -> bool:
    """Whether round ``round_`` lies in an evidence window of a defense deciding at rounds ``window``,
    ``window + every``, ... (``every = 0``: at ``window`` only) from the last ``window`` rounds;
    ``window = 0``: every round."""
    if window == 0 or round_ <= window:
        return True
    if every == 0:
        return False
    end = round_ + (window - round_) % every  # the next decision
    return end - round_ < window


@register
class AurorAdaptive(LabelFlip):
    """Label flipping whose every upload coordinate stays within the honest users' spread."""

    name = "auror_adaptive"
    summary = "label flipping kept inside the honest per-coordinate spread, to evade AUROR (adaptive)"
    Params = AurorAdaptiveParams
    omniscient = True
    search_ranges = {
        "attack.auror_adaptive.spread": (0.1, 4.0, True, False),
        "attack.auror_adaptive.max_shift": (0.0, 0.05, False, False),
        "attack.auror_adaptive.stealth_rounds": (0, 10, False, True),
        "attack.auror_adaptive.redetect_every": (0, 10, False, True),
        "attack.poisoned_fraction": (0.1, 1.0, False, False),
        "attack.boost": (1.0, 10.0, True, False),
        "attack.malicious_epochs": (1, 5, False, True),
    }

    @classmethod
    def warmup_rounds(cls, cfg) -> int:
        """A stealthy trial attacks only after its stealth rounds: no pruning before the longest searched."""
        return int(cls.search_ranges["attack.auror_adaptive.stealth_rounds"][1]) + 2

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        if not stealthy(updates.round, self.params.stealth_rounds, self.params.redetect_every):
            return updates.own
        return within_spread(updates.own, updates.honest, self.params.spread, self.params.max_shift)
