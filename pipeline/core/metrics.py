"""Metric definitions of the AUROR paper, as pure functions."""

from __future__ import annotations

from pipeline.lazy import torch


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


def defense_detection_rates(flags: str, flagged: set[int], excluded: list[list[int]], malicious: torch.Tensor,
                            participants: list[list[int]] | None = None) -> tuple[float | None, float | None]:
    """A defense's DR and FPR, by how it flags (:attr:`pipeline.defenses.base.Defense.flags`), over the users it
    could judge: with ``participants`` (per round, under sampling) those who took part, else everyone.

    - ``"none"`` (a robust aggregator that excludes nobody): ``None, None``;
    - ``"run"`` (flags once, as AUROR): :func:`detection_rates` of the ``flagged`` users, among the users who
      took part in at least one round;
    - ``"round"``: :func:`detection_rates` of each round's ``excluded`` users among that round's participants,
      averaged over the rounds where it is defined (a sampled round may hold no attacker).
    """
    if flags == "none":
        return None, None
    rounds = [sorted(flagged)] if flags == "run" else excluded
    if participants is None:  # everyone, every round
        judged = [torch.arange(len(malicious))] * len(rounds)
    elif flags == "run":
        judged = [torch.as_tensor(sorted({u for ids in participants for u in ids}), dtype=torch.long)]
    else:
        judged = [torch.as_tensor(ids, dtype=torch.long) for ids in participants]
    rates = []
    for ids, users in zip(rounds, judged):
        mask = torch.zeros_like(malicious, dtype=torch.bool)
        mask[ids] = True
        rates.append(detection_rates(mask[users], malicious[users]))
    dr, fpr = ([r[k] for r in rates if r[k] is not None] for k in (0, 1))  # the rounds where each is defined
    return (sum(dr) / len(dr) if dr else None), (sum(fpr) / len(fpr) if fpr else None)


def accuracy_drop(benign_accuracy: float | None, accuracy: float) -> float | None:
    """AD(M_B -> M) = A(M_B) - A(M); ``None`` without the benign model's accuracy."""
    return None if benign_accuracy is None else benign_accuracy - accuracy


def attack_success(attack_success_rate: float | None, drop: float | None) -> float | None:
    """An attack's own success: its SR when targeted, the accuracy drop when untargeted (no SR)."""
    return drop if attack_success_rate is None else attack_success_rate
