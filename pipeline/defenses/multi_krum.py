"""Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017): the
mean of the ``m`` updates with the lowest Krum scores (see :mod:`pipeline.defenses.krum`
for the score, the assumed attackers ``f`` and the fallback)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.defenses import register
from pipeline.defenses.base import check
from pipeline.defenses.krum import Krum, KrumParams


@dataclass
class MultiKrumParams(KrumParams):
    selected_fraction: float = 0.0  # m = round(fraction * n) in [1, n]; 0: m = n - f

    def validate(self, key: str) -> None:
        super().validate(key)
        check(0 <= self.selected_fraction <= 1, f"{key}.selected_fraction", "must be in [0, 1] (0: n - f)",
              self.selected_fraction)



@register
class MultiKrum(Krum):
    """Multi-Krum: the step is the mean of the ``m`` complete updates with the
    lowest Krum scores (``m = n - f`` by default); the others are left out."""

    name = "multi_krum"
    summary = "Multi-Krum (Blanchard et al. 2017): mean of the m updates with the lowest Krum scores"
    Params = MultiKrumParams
    search_ranges = {"byzantine_fraction": (0.05, 0.45, False)}

    def num_selected(self, n: int, f: int) -> int:
        fraction = self.params.selected_fraction
        return n - f if fraction == 0 else min(max(round(fraction * n), 1), n)
