"""FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020, "The Limitations of Federated
Learning in Sybil Settings"): sybils pushing one poisoning goal send alike
updates round after round, so a user whose accumulated updates are too similar
to another user's is down-weighted.

Algorithm 1 of the paper, each round, over the users with a whole upload:

1. history: ``H_i += Δ_i`` (the sum of all of user i's updates so far);
2. ``cs_ij = cos(H_i, H_j)``, ``cs_ii = 0``; ``v_i = max_j cs_ij``;
3. pardoning: ``cs_ij *= v_i / v_j`` where ``v_j > v_i`` (an honest user that
   merely resembles a sybil is not punished for the sybil's similarity);
4. ``wv_i = 1 - max_j cs_ij``, clipped to [0, 1], divided by its maximum, capped at 0.99;
5. logit: ``wv_i = κ (ln(wv_i / (1 - wv_i)) + 0.5)``, clipped to [0, 1].

Choices against the paper:

- the step is the weighted mean ``Σ wv_i Δ_i / Σ wv_i`` (the paper scales each
  user's learning rate by ``wv_i``, i.e. adds ``Σ wv_i Δ_i``): the step keeps
  FedAvg's scale whatever the number of users; zero when every ``wv_i`` is 0;
- no "importance feature" weighting (the paper's optional re-weighting of the
  output layer's features): every coordinate counts in the cosine;
- steps 4-5 in the order of the authors' reference code (clip, rescale, cap,
  logit, clip); when every ``wv_i`` is 0 (all histories alike) every weight is
  0 instead of the paper's division by zero;
- the history is of the raw updates (FLPoison first scales updates of norm > 1 to norm 1).

Parameters (``defense.foolsgold``): ``confidence`` κ > 0 (default 1.0, the
paper's; larger spreads the weights further from 0.5).

``Aggregate.weights``: ``wv_i / Σ_j wv_j``, each user's share of the step; 0 for
the users with ``wv_i = 0`` and those without a whole upload this round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads, complete_rows, weighted_mean
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number


def cosine_similarities(rows: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``rows`` (n, P): (n, n), float64,
    one product of the row-normalised matrix; a zero row has similarity 0 with every row."""
    x = rows.double()
    gram = x @ x.T  # normalised afterwards, on (n, n): one pass over the matrix
    norms = gram.diagonal().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return gram / norms[:, None] / norms[None, :]


class Histories:
    """FoolsGold's step 1, one row per user seen so far (sampled rounds: not one per user id).

    ``rows`` is ``(capacity, P)``, grown by doubling, row ``index[u]`` the sum of user u's updates; summed in
    place, so a round costs the users it holds, not a copy of everyone's history."""

    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        self.rows: torch.Tensor | None = None

    def add(self, user_ids: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        """Add ``updates`` (n, P) to the histories of ``user_ids`` (n,); return those histories (n, P)."""
        users = user_ids.tolist()
        for user in users:
            self.index.setdefault(user, len(self.index))
        if self.rows is None:
            self.rows = updates.new_zeros(0, updates.shape[1])
        self.rows = self.rows.to(device=updates.device, dtype=updates.dtype)  # a resumed state: on the CPU
        if len(self.index) > len(self.rows):
            grown = self.rows.new_zeros(max(len(self.index), 2 * len(self.rows)), self.rows.shape[1])
            grown[: len(self.rows)] = self.rows
            self.rows = grown
        at = torch.tensor([self.index[u] for u in users], dtype=torch.long, device=updates.device)
        self.rows.index_add_(0, at, updates)
        return self.rows[at]

    def of(self, user: int) -> torch.Tensor | None:
        """User ``user``'s history, ``None`` before its first whole upload."""
        return None if user not in self.index else self.rows[self.index[user]]

    def state_dict(self) -> dict[str, Any]:
        if self.rows is None:
            return {}
        ids = sorted(self.index, key=self.index.get)
        return {"history": self.rows[: len(ids)], "user_ids": torch.tensor(ids, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = state.get("history")
        # a checkpoint from before the rows were per user seen: row u is user u's
        ids = state["user_ids"].tolist() if "user_ids" in state else range(0 if self.rows is None else len(self.rows))
        self.index = {u: row for row, u in enumerate(ids)}


def foolsgold_weights(histories: torch.Tensor, confidence: float = 1.0) -> torch.Tensor:
    """FoolsGold's ``wv`` (n,) in [0, 1], float64, from the users' histories (n, P) (steps 2-5)."""
    cs = cosine_similarities(histories).fill_diagonal_(0)
    v = cs.max(dim=1).values  # >= 0: the diagonal's 0 is in the max
    pardon = v[None, :] > v[:, None]  # [i, j]: v_j > v_i, hence v_j > 0
    cs = torch.where(pardon, cs * v[:, None] / v[None, :], cs)
    wv = (1 - cs.max(dim=1).values).clamp(0, 1)
    if wv.max() <= 0:
        return torch.zeros_like(wv)
    wv = (wv / wv.max()).clamp(max=0.99)
    return (confidence * (torch.log(wv / (1 - wv)) + 0.5)).clamp(0, 1)  # log(0) = -inf -> 0


@dataclass
class FoolsGoldParams(DefenseParams):
    confidence: float = 1.0  # κ of the logit

    def validate(self, key: str) -> None:
        k = self.confidence
        check(finite_number(k) and k > 0,
              f"{key}.confidence", "must be a finite number > 0", k)


@register
class FoolsGold(Defense):
    """Weigh each user by how unlike its accumulated updates are to any other user's."""

    name = "foolsgold"
    summary = "FoolsGold (RAID 2020): down-weight users whose accumulated updates look alike (sybils)"
    Params = FoolsGoldParams
    search_ranges = {"confidence": (0.1, 4.0, True)}
    flags = "round"
    handles_missing = False

    def __init__(self, params: FoolsGoldParams, server) -> None:
        super().__init__(params, server)
        self.history = Histories()  # the sum of each seen user's updates

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        used = complete_rows(updates)
        histories = self.history.add(uploads.user_ids[used], updates[used])
        wv = torch.zeros(len(updates), dtype=torch.float64, device=updates.device)
        if used.any():
            wv[used] = foolsgold_weights(histories, self.params.confidence)
        weights = wv / wv.sum() if wv.sum() > 0 else wv
        return Aggregate(weighted_mean(updates, weights), weights.to(updates.dtype))

    def state_dict(self) -> dict[str, Any]:
        return self.history.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state)
