"""No defense: federated averaging (McMahan et al., AISTATS 2017), or with DSSGD
masking Shokri & Shmatikov's per-coordinate mean (CCS 2015)."""

from __future__ import annotations

from pipeline.core.masking import aggregate_per_coordinate
from pipeline.core.server import Aggregate, Uploads, present_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense


@register
class NoDefense(Defense):
    """Every coordinate's mean over the users who uploaded it; nobody is left out.

    With whole uploads (``protocol.theta_u = 1``) this is the plain mean of the
    updates (FedAvg with equal weights).
    """

    name = "none"
    summary = "no defense: per-coordinate mean of the uploads (FedAvg; DSSGD with theta_u < 1)"
    flags = "none"
    composable = True
    handles_missing = True

    def aggregate(self, uploads: Uploads) -> Aggregate:
        present = present_rows(uploads.updates)
        return Aggregate(aggregate_per_coordinate(uploads.updates, present))
