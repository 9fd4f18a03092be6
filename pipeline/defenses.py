"""Defenses as loop callbacks: they see :class:`~pipeline.loop.Uploads` only."""

from __future__ import annotations

import logging

import torch

from pipeline.auror import Auror
from pipeline.loop import Callback, Uploads

log = logging.getLogger("auror")


class AurorCallback(Callback):
    """Collect every user's update over the first ``window_rounds`` rounds, run
    :class:`~pipeline.auror.Auror` on them at the end of the window, and reject
    the flagged users from that round on.

    ``window_reduce="mean"`` averages each parameter's update over the window
    (one feature per parameter); ``"stack"`` keeps one feature per (round, parameter).
    """

    def __init__(self, detector: Auror, window_rounds: int, window_reduce: str = "mean") -> None:
        self.detector = detector
        self.window_rounds = window_rounds
        self.window_reduce = window_reduce
        self._window: list[torch.Tensor] = []
        self.flagged: set[int] = set()
        self.report: dict = {"detection_round": None, "flagged_users": []}

    def reject(self, uploads: Uploads) -> set[int]:
        if uploads.round <= self.window_rounds:
            self._window.append(uploads.updates)
            if uploads.round == self.window_rounds:
                self._detect(uploads)
        return self.flagged

    def state_dict(self) -> dict:
        return {"window": list(self._window), "flagged": sorted(self.flagged), "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        self._window = list(state["window"])
        self.flagged = set(state["flagged"])
        self.report = state["report"]

    def _detect(self, uploads: Uploads) -> None:
        # (rounds, users, parameters); NaN: not uploaded (or left out). Rounds restored from a checkpoint are on the CPU
        window = torch.stack([w.to(uploads.updates.device) for w in self._window])
        self._window = []
        # a user absent from every window round gets an all-NaN row: no feature, score 0, never flagged
        features = window.nanmean(0) if self.window_reduce == "mean" else window.permute(1, 0, 2).flatten(1)
        d = self.detector.fit(features)
        ids = uploads.user_ids.tolist()
        self.flagged = {ids[i] for i in d.flagged_.nonzero()[0]}
        self.report = {
            "detection_round": uploads.round,
            "flagged_users": sorted(self.flagged),
            "scores": {str(u): round(float(s), 4) for u, s in zip(ids, d.scores_)},
            "threshold": d.threshold_,
            "num_features": int(d.indicative_.size),
            "num_indicative_features": int(d.indicative_.sum()),
        }
        log.info(
            "  AUROR at round %d: %d of %d features indicative, flagged users %s",
            uploads.round, d.indicative_.sum(), d.indicative_.size, sorted(self.flagged) or "none",
        )
