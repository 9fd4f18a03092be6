"""FLTrust (Cao, Fang, Liu, Gong, NDSS 2021, "FLTrust: Byzantine-robust Federated
Learning via Trust Bootstrapping"): the server trains on its own small clean
root set and trusts each user as far as the user's update points its way.

Each round, with ``g0`` the server's update on its root set (``ServerInputs.root_update``):

- trust score ``TS_i = ReLU(cos(g_i, g0))`` (an update against the server's counts 0);
- each ``g_i`` is rescaled to the norm of ``g0`` (a scaled-up update gains nothing);
- step ``= Σ_i TS_i (‖g0‖ / ‖g_i‖) g_i / Σ_i TS_i``; zero when every ``TS_i`` is 0.

The step is added to the global model as is (the paper's global learning rate is 1).

Parameters (``defense.fltrust``): ``root_size`` (default 100, the paper's), the
number of clean samples the server holds. The data layer
(``datamodules/federated.py``) draws them uniformly at random from the training
set and removes them from every user's data; the server trains on them as a
user does (``root_epochs`` local epochs from the current global model).

``Aggregate.weights``: ``TS_i / Σ_j TS_j``, each rescaled update's share of the
step; 0 for the users with ``TS_i = 0`` and those without a whole upload this round.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, ServerInputs, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, whole_number


def fltrust(updates: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLTrust's ``(step (P,), trust scores (n,) float64)`` for the updates (n, P)
    and the server's update ``root`` (P,); the step in ``updates``' dtype."""
    tiny = torch.finfo(torch.float64).tiny
    x, g0 = updates.double(), root.double().to(updates.device)
    norms, g0_norm = x.norm(dim=1), g0.norm()
    trust = torch.relu((x @ g0) / (norms * g0_norm).clamp_min(tiny))  # a zero vector: trust 0
    if trust.sum() <= 0:
        return updates.new_zeros(updates.shape[1]), trust
    rescaled = x * (g0_norm / norms.clamp_min(tiny))[:, None]
    return ((trust @ rescaled) / trust.sum()).to(updates.dtype), trust


@dataclass
class FLTrustParams(DefenseParams):
    root_size: int = 100  # clean samples held by the server (the root set)

    def validate(self, key: str) -> None:
        n = self.root_size
        check(whole_number(n) and n >= 1,
              f"{key}.root_size", "must be an integer >= 1", n)


@register
class FLTrust(Defense):
    """Trust each user by the cosine of its update with the server's root-set update."""

    name = "fltrust"
    summary = "FLTrust (NDSS 2021): weigh norm-matched updates by their cosine with the server's root-set update"
    Params = FLTrustParams
    flags = "round"
    composable = True
    handles_missing = False
    needs_root_data = True

    def __init__(self, params: FLTrustParams, server: ServerInputs) -> None:
        super().__init__(params, server)
        if server.root_update is None:
            raise RuntimeError("FLTrust needs the server's root-set update (ServerInputs.root_update)")

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        used = complete_rows(updates)
        weights = torch.zeros(len(updates), dtype=updates.dtype, device=updates.device)
        if not used.any():
            return Aggregate(updates.new_zeros(updates.shape[1]), weights)
        step, trust = fltrust(updates[used], self.server.root_update(uploads.round))
        weights[used] = (trust / trust.sum() if trust.sum() > 0 else trust).to(updates.dtype)
        return Aggregate(step, weights)
