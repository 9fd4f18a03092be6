import pytest
import torch

from pipeline.core.metrics import accuracy, attack_success_rate, detection_rates


def test_accuracy_and_attack_success_on_hand_made_predictions():
    labels = torch.tensor([1, 1, 1, 1, 7, 7, 0, 0])
    predicted = torch.tensor([7, 7, 1, 0, 7, 1, 0, 0])
    assert accuracy(predicted, labels) == pytest.approx(4 / 8)
    assert attack_success_rate(predicted, labels, source=1, target=7) == pytest.approx(2 / 4)
    assert attack_success_rate(predicted, labels, source=7, target=1) == pytest.approx(1 / 2)


def test_attack_success_needs_source_samples():
    with pytest.raises(ValueError, match="source class 3"):
        attack_success_rate(torch.tensor([0]), torch.tensor([0]), source=3, target=0)


def test_detection_and_false_positive_rates():
    malicious = torch.tensor([True, True, False, False, False, False])
    flagged = torch.tensor([True, False, True, False, False, False])
    assert detection_rates(flagged, malicious) == (pytest.approx(0.5), pytest.approx(0.25))
    assert detection_rates(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == (None, 0.0)
