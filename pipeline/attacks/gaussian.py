"""Gaussian noise (Blanchard et al., "Machine learning with adversaries: Byzantine tolerant gradient
descent", NeurIPS 2017: its experiments' Gaussian Byzantine workers; byzfl's ``Gaussian``).

Every malicious user uploads a vector of independent ``N(mu, sigma^2)`` coordinates, its own draw,
from a generator keyed by (run seed, round), apart from every other random stream: the same noise
on every device and after a resume. Not omniscient; the attackers' training is not used.
``sigma`` is per coordinate. The default is 0.1, not byzfl's 1.0: on our configs 1.0 is above the
server's guard (an update whose RMS exceeds 100x the median's is left out as faulty,
``faults.max_norm_ratio``), so it never reaches a defense (digits, 10 rounds: accuracy drop 0.009 at
1.0, 0.140 at 0.1). Untargeted: success is the accuracy drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.attacks import register
from pipeline.attacks.base import ACCURACY_DROP, Attack, AttackParams, RoundUpdates, check, finite_number
from pipeline.core.device import seeded_generator

GAUSSIAN_STREAM = 2**32 - 6  # the attack's noise, apart from the users', the sampler's and the defenses' streams


def gaussian_uploads(shape: tuple[int, int], mu: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``(attackers, P)`` independent ``N(mu, sigma^2)`` draws, one attacker's ``P`` after the other (each
    row as a draw of ``(P,)`` alone gives it); on the CPU, so the same on every device."""
    attackers, size = shape
    return torch.stack([torch.randn(size, generator=generator) for _ in range(attackers)]) * sigma + mu


@dataclass
class GaussianParams(AttackParams):
    mu: float = 0.0  # mean of every coordinate
    sigma: float = 0.1  # standard deviation of every coordinate

    def validate(self, key: str) -> None:
        check(finite_number(self.mu), f"{key}.mu", "must be a finite number", self.mu)
        check(finite_number(self.sigma) and self.sigma > 0, f"{key}.sigma", "must be a finite number > 0",
              self.sigma)


@register
class Gaussian(Attack):
    """Each attacker uploads Gaussian noise."""

    name = "gaussian"
    summary = "Gaussian noise: each attacker uploads N(mu, sigma^2) coordinates (Blanchard et al. 2017); untargeted"
    Params = GaussianParams
    trains_maliciously = False
    success_metric = ACCURACY_DROP
    search_ranges = {"attack.gaussian.sigma": (1e-3, 10.0, True, False)}

    def craft(self, updates: RoundUpdates) -> torch.Tensor:
        generator = seeded_generator(updates.seed, updates.round, GAUSSIAN_STREAM)
        noise = gaussian_uploads(tuple(updates.own.shape), self.params.mu, self.params.sigma, generator)
        return noise.to(device=updates.own.device, dtype=updates.own.dtype)
