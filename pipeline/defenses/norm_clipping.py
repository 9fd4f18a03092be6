"""Norm clipping (Sun, Kairouz, Suresh & McMahan, "Can you really backdoor
federated learning?", 2019): every update is scaled down to L2 norm at most
``M``, then averaged.

``max_norm = 0`` (the default) takes ``M`` as the median norm of this round's
present updates (mean of the two middle ones for an even count): scale-free, no
tuning to the model's update size; at most half the users are clipped. With
partial (DSSGD-masked) uploads a user's norm is over the values it uploaded
and the mean is per coordinate over the users who uploaded it.

``noise_std`` sigma > 0 adds Gaussian noise ``N(0, sigma^2)`` to every coordinate of the step: Sun et
al.'s weak differential privacy, drawn on the CPU
from a generator keyed by (run seed, round), so the same on every device and after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from pipeline.lazy import torch

from pipeline.core.device import seeded_generator
from pipeline.core.masking import aggregate_per_coordinate
from pipeline.core.server import Aggregate, Uploads, present_rows
from pipeline.defenses import register
from pipeline.defenses.base import Defense, DefenseParams, check


NOISE_STREAM = 2**32 - 8  # the weak-DP noise, apart from every other random stream


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of ``x`` (n, P) over its non-NaN values (float64, (n,))."""
    return torch.linalg.vector_norm(torch.nan_to_num(x, nan=0.0), dim=1, dtype=torch.float64)


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``x`` with each row scaled to L2 norm at most ``max_norm`` (NaN stay NaN)."""
    norms = row_norms(x)
    scale = torch.where(norms > max_norm, max_norm / norms, 1.0)
    return x * scale.to(x.dtype)[:, None]


@dataclass
class NormClippingParams(DefenseParams):
    max_norm: float = 0.0  # L2 bound per update; 0: the median norm of the round's updates
    noise_std: float = 0.0  # std of the Gaussian noise added to every coordinate of the step (weak DP); 0: none

    unkeyed_defaults: ClassVar[dict] = {"noise_std": 0.0}  # added after the committed norm_clipping cells

    def validate(self, key: str) -> None:
        check(math.isfinite(self.max_norm) and self.max_norm >= 0, f"{key}.max_norm",
              "must be a finite number >= 0 (0: the round's median norm)", self.max_norm)
        check(math.isfinite(self.noise_std) and self.noise_std >= 0, f"{key}.noise_std",
              "must be a finite number >= 0 (0: no noise)", self.noise_std)


@register
class NormClipping(Defense):
    """Clip every update to L2 norm ``max_norm`` (0: the round's median norm),
    then the per-coordinate mean; nobody is left out."""

    name = "norm_clipping"
    summary = "norm clipping (Sun et al. 2019): clip each update to L2 norm max_norm (0: round median), mean, + noise_std"
    Params = NormClippingParams
    flags = "none"
    composable = True
    handles_missing = True

    def aggregate(self, uploads: Uploads) -> Aggregate:
        updates = uploads.updates
        present = present_rows(updates)
        if not present.any():
            return Aggregate(torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device))
        bound = self.params.max_norm or float(torch.quantile(row_norms(updates[present]), 0.5))
        step = aggregate_per_coordinate(clip_rows(updates, bound), present)
        if self.params.noise_std > 0:
            generator = seeded_generator(self.server.seed, uploads.round, NOISE_STREAM)
            noise = torch.randn(step.shape, generator=generator, dtype=step.dtype) * self.params.noise_std
            step = step + noise.to(step.device)
        return Aggregate(step)
