"""AUROR for label skew: flag the users who consistently pull one class's
output neuron *against* what the others teach it.

Faithful AUROR (:mod:`pipeline.defenses.auror`) assumes honest users' updates
look alike, feature by feature; under a Dirichlet split they do not (a user
with many 7s and one with none differ on most parameters), so it finds few
indicative features and flags almost nobody (docs/noniid.md). This detector
keeps AUROR's idea (the poisoners are a minority that contradicts the others
on the features the attack needs) but reads it where label skew leaves the
honest users in agreement, after Jebreel et al. ("LFighter", Neural Networks
2024: the source and target classes' output neurons carry the label-flipping
signal) and FLDetector-style consistency over rounds:

1. features: each user's output-layer weight rows (classes x hidden), divided
   by the norm of its whole output-layer weight update (a boosted upload and a
   small one weigh alike: only the direction counts), summed over the rounds
   the user uploaded (its *history*: what it has consistently taught);
2. a consensus per class: the coordinate-wise median of the users' history
   rows; ``alignment[u, c]`` = user u's history row c, over the norm of all its
   history rows, projected on that consensus direction. An honest user holding
   class c pulls row c towards c's features (> 0); one lacking it pushes it
   away a little (its inputs are rarely predicted as c); a label flipper pushes
   the source row hard away (its relabelled source inputs are predicted as the
   source class, and it is told they are not);
3. the suspect class: the most opposed (largest sum of negative alignments);
4. from round ``window_rounds`` on, the users whose alignment on the suspect
   class is below ``-margin`` are flagged and left out of the aggregate (the
   mean of the others); flags are read anew every round from the histories.
   Histories, not the round's rows: once the model fits the source class the
   honest users' pull on its row fades and one round's consensus turns to
   noise, while the summed rows keep what each user consistently did.

It sees the uploads only (no data, no labels, no class the attack uses).
Limits, measured in docs/noniid.md: an honest user lacking a class that its own
classes are often confused with (no 9s among many 4s) pushes that row away
too, and can be flagged in a run with no attacker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.lazy import torch

from pipeline.core.masking import aggregate_per_coordinate
from pipeline.core.server import Aggregate, ParameterSlice, Uploads, complete_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check, finite_number


def accumulate(history: torch.Tensor | None, user_ids: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """A new history (users, F), row ``u`` the sum of user u's rows: ``history`` (None: none yet; moved to
    ``updates``' device) grown to the largest id, plus ``updates`` (n, F) at the rows ``user_ids`` (n,).
    One row per id up to the largest: the output layer's classes x hidden values a user."""
    if history is None:
        history = updates.new_zeros(0, updates.shape[1])
    history = history.to(device=updates.device, dtype=updates.dtype)
    rows = int(user_ids.max()) + 1 if len(user_ids) else 0
    if rows > len(history):
        history = torch.cat([history, history.new_zeros(rows - len(history), history.shape[1])])
    return history.index_add(0, user_ids.to(updates.device), updates)


def output_weight(layout: tuple[ParameterSlice, ...]) -> ParameterSlice:
    """The last 2-D parameter tensor (the output layer's weight, classes x hidden)."""
    return next(p for p in reversed(layout) if len(p.shape) == 2)


def normalised(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (users, classes, hidden) in float64, each user's divided by the norm of all its rows."""
    x = rows.double()
    return x / x.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)[:, None, None]


def class_alignment(rows: torch.Tensor) -> torch.Tensor:
    """``alignment[u, c]`` (users, classes), float64: user u's row c of ``rows``
    (users, classes, hidden), divided by the norm of all of u's rows, projected on
    the unit direction of the coordinate-wise median of row c over users."""
    x = normalised(rows)
    consensus = x.median(dim=0).values  # (classes, hidden); torch's lower median for an even count
    unit = consensus / consensus.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.einsum("uch,ch->uc", x, unit)


def opposition(alignment: torch.Tensor) -> torch.Tensor:
    """Per class (classes,): the sum of the users' negative alignments, as a positive number."""
    return (-alignment).clamp_min(0).sum(0)


def flag_opposed(alignment: torch.Tensor, margin: float) -> tuple[int, torch.Tensor]:
    """The suspect class (the most opposed) and the users (bool (users,)) whose alignment
    (users, classes) on it is below ``-margin``."""
    suspect = int(opposition(alignment).argmax())
    return suspect, alignment[:, suspect] < -margin


@dataclass
class AurorNonIIDParams(DefenseParams):
    margin: float = 0.05  # flag an alignment (of the summed rows) on the suspect class below -margin
    window_rounds: int = 3  # rounds of evidence before the first flag

    def validate(self, key: str) -> None:
        check(finite_number(self.margin) and 0 <= self.margin < 1, f"{key}.margin", "must be in [0, 1)",
              self.margin)
        check(isinstance(self.window_rounds, int) and self.window_rounds >= 1, f"{key}.window_rounds",
              "must be an integer >= 1", self.window_rounds)


@register
class AurorNonIID(Defense):
    """Flag users whose output-layer rows consistently oppose the consensus on the most opposed class."""

    name = "auror_noniid"
    summary = ("AUROR for label skew: flag users who consistently oppose the others on the most opposed "
               "class's output neuron")
    Params = AurorNonIIDParams
    search_ranges = {"margin": (0.005, 0.2, True)}
    flags = "run"
    handles_missing = False  # a user's rows are compared whole

    def __init__(self, params: AurorNonIIDParams, server) -> None:
        super().__init__(params, server)
        self.weight = output_weight(server.layout)
        self.history: torch.Tensor | None = None  # (users, classes x hidden): each user's summed normalised rows
        self.detection: dict[str, Any] = {"suspect_class": None, "flagged_users": [], "scores": {}}

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates, w = uploads.updates, self.weight
        used = complete_rows(updates)
        ids = uploads.user_ids[used]
        if len(ids):
            rows = updates[used][:, w.start:w.stop].reshape(len(ids), *w.shape)
            self.history = accumulate(self.history, ids, normalised(rows).flatten(1))
        seen = (self.history != 0).any(1).nonzero().flatten() if self.history is not None else ids[:0]
        if len(seen) >= 2:
            alignment = class_alignment(self.history[seen].reshape(len(seen), *w.shape))
            suspect, opposed = flag_opposed(alignment, self.params.margin)
            if uploads.round >= self.params.window_rounds:
                self.flagged = set(seen[opposed.to(seen.device)].tolist())
            self.detection = {"suspect_class": suspect, "flagged_users": sorted(self.flagged),
                              "scores": {str(u): round(float(a), 4)
                                         for u, a in zip(seen.tolist(), alignment[:, suspect])}}
        out = torch.tensor(sorted(self.flagged), dtype=torch.long, device=updates.device)
        accepted = used & ~torch.isin(uploads.user_ids, out)
        return Aggregate(aggregate_per_coordinate(updates, accepted), accepted / accepted.sum().clamp(min=1))

    def report(self) -> dict[str, Any]:
        return self.detection

    def state_dict(self) -> dict[str, Any]:
        if self.history is None:
            return {}
        return {"history": self.history, "flagged": sorted(self.flagged), "detection": self.detection}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.history, self.flagged, self.detection = state["history"], set(state["flagged"]), state["detection"]

    @classmethod
    def check_config(cls, params: AurorNonIIDParams, cfg, key: str) -> None:
        super().check_config(params, cfg, key)
        check(params.window_rounds <= cfg.training.rounds, f"{key}.window_rounds",
              f"must be in [1, training.rounds={cfg.training.rounds}]", params.window_rounds)

    @classmethod
    def warmup_rounds(cls, params: AurorNonIIDParams, cfg) -> int:
        return min(params.window_rounds, cfg.training.rounds)
