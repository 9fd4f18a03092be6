"""Metric definitions of the AUROR paper, as pure functions."""

from __future__ import annotations

import torch


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples predicted correctly."""
    return (predicted == labels).float().mean().item()


def attack_success_rate(predicted: torch.Tensor, labels: torch.Tensor, source: int, target: int) -> float:
    """SR: fraction of source-class samples that the model classifies as the target class."""
    is_source = labels == source
    if not is_source.any():
        raise ValueError(f"no test sample of the source class {source}")
    return (predicted[is_source] == target).float().mean().item()


def detection_rates(flagged: torch.Tensor, malicious: torch.Tensor) -> tuple[float | None, float | None]:
    """DR (fraction of malicious users flagged) and FPR (fraction of benign users flagged).

    Each is ``None`` when its denominator is empty (no malicious / no benign user).
    """
    flagged, malicious = flagged.bool(), malicious.bool()
    dr = flagged[malicious].float().mean().item() if malicious.any() else None
    fpr = flagged[~malicious].float().mean().item() if (~malicious).any() else None
    return dr, fpr
