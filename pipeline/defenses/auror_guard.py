"""AUROR that keeps watching: the paper's detector (:class:`~pipeline.defenses.auror.Auror`, unchanged)
under a policy that decides again, repairs the model and knows when there is nothing to find.

Faithful AUROR decides once, at the end of round ``window_rounds``, by a fixed ``tau``, and only
leaves the flagged users out from then on. Measured on MNIST (``reports/compare_mnist.md``), that
policy is what loses: an attacker stealthy for the window gets through; a backdoor written in the
window's rounds stays in the model; and under label skew no single ``tau`` flags the attackers
without flagging everyone when nobody attacks. ``auror_guard`` is ``auror`` with the three options
of :class:`~pipeline.defenses.auror.AurorDefense` set:

- ``redetect_every = window_rounds``: a decision at the end of every window, the windows tiling the
  rounds (no round escapes every window), among the users not flagged yet;
- ``recovery = restart``: on a new flag, back to the global model before that window and the
  window's rounds trained again without every flagged user;
- ``threshold = gap``: flag only a minority whose scores stand apart from the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.defenses import register
from pipeline.defenses.auror import AurorDefense, AurorParams


@dataclass
class AurorGuardParams(AurorParams):
    redetect_every: int = 3
    recovery: str = "restart"
    threshold: str = "gap"


@register
class AurorGuard(AurorDefense):
    """AUROR's detector, deciding at every window, retraining without the flagged, flagging by a gap."""

    name = "auror_guard"
    summary = ("AUROR's detector deciding at every window, retraining from before the evidence without the "
               "flagged users, flagging only a separated minority")
    Params = AurorGuardParams
