"""DeepSight: its statistics on hand-worked updates, the cluster rules, the server's model probes, and the
defense end to end (it removes BadNets' attackers on the digits and lets label flippers through)."""

import re

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from pipeline.core.errors import ConfigError
from pipeline.core.server import ParameterSlice, ServerInputs, Uploads
from pipeline.defenses import REGISTRY
from pipeline.defenses.deepsight import (accepted_models, clipped_mean, cluster_dissimilarity, division_differences,
                                         normalised_energies, threshold_exceedings)
from pipeline.experiment.arms import run_arm
from pipeline.experiment.config import load_config
from tests.conftest import TINY

DIGITS = ["attack.name=backdoor", "training.rounds=10", "training.device=cpu"]


def test_normalised_energies_and_threshold_exceedings_by_hand():
    # user 0: class energies |b| + sum |W| = 1 + 2 = 3 and 0 + 1 = 1 -> NEUPs 9/10, 1/10;
    # user 1: 1 + 1 = 2 both -> 1/2, 1/2
    weight = torch.tensor([[[1.0, -1.0], [0.5, -0.5]], [[0.5, 0.5], [-1.0, 0.0]]], dtype=torch.float64)
    bias = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    neups = normalised_energies(weight, bias)
    assert_close(neups, torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64))
    # two classes: the threshold is max(0.01, 1/2) x the largest NEUP: 0.45 and 0.25
    assert threshold_exceedings(neups, 0.01).tolist() == [1, 2]
    # ten classes of which one holds 0.91 and nine 0.01: 1/10 x 0.91 counts one, whatever the smaller factor
    one = torch.tensor([[0.91] + [0.01] * 9], dtype=torch.float64)
    assert threshold_exceedings(one, 0.01).tolist() == [1] and threshold_exceedings(one, 0.0).tolist() == [1]
    # four classes 0.3, 0.3, 0.3, 0.1: the threshold 1/4 x 0.3 counts four; factor 0.5 (0.15) counts three
    spread = torch.tensor([[0.3, 0.3, 0.3, 0.1]], dtype=torch.float64)
    assert threshold_exceedings(spread, 0.01).tolist() == [4] and threshold_exceedings(spread, 0.5).tolist() == [3]


def test_division_differences_of_the_global_model_are_one():
    p = torch.softmax(torch.randn(40, 5, generator=torch.Generator().manual_seed(0)), 1)
    assert_close(division_differences(p.expand(3, -1, -1), p), torch.ones(3, 5, dtype=torch.float64))
    doubled = p.clone()
    doubled[:, 0] *= 2  # not probabilities any more: the ratio is read as it is
    assert_close(division_differences(doubled[None], p)[0, 0], torch.tensor(2.0, dtype=torch.float64))


def test_an_unclustered_model_is_a_cluster_of_its_own():
    labels = np.array([0, 0, -1, 1, -1])
    expected = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 1, 0]])
    assert (cluster_dissimilarity(labels) == expected).all()
    # cluster 0: 1 of 3 suspicious is not fewer than tau = 1/3 of 3; cluster 1: 2 of 2; the unclustered 5 is
    # suspicious, 6 is not
    labels = np.array([0, 0, 0, 1, 1, -1, -1, 2, 2, 2, 2])
    suspicious = np.array([0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0], dtype=bool)
    assert accepted_models(labels, suspicious, 1 / 3).tolist() == [False] * 6 + [True] * 5
    # tau 1/2: cluster 0 (1 of 3) and cluster 2 (1 of 4) pass
    assert accepted_models(labels, suspicious, 0.5).tolist() == [True] * 3 + [False] * 3 + [True] * 5


def test_clipped_mean_scales_to_the_median_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [30.0, 40.0]], dtype=torch.float64)  # norms 5, 1, 2, 50
    # median norm 3.5: rows 0 and 3 scaled to 3.5, rows 1 and 2 kept
    accepted = torch.tensor([True, True, False, True])
    assert_close(clipped_mean(x, accepted), (torch.tensor([2.1, 2.8]) + torch.tensor([0.0, 1.0])
                                             + torch.tensor([2.1, 2.8])).double() / 3)
    assert torch.equal(clipped_mean(x, torch.zeros(4, dtype=torch.bool)), torch.zeros(2, dtype=torch.float64))


def test_the_server_probes_each_model_as_the_global_model_plus_its_update(monkeypatch):
    """``ServerInputs.model_outputs`` during a run: row 0 (zeros) is the global model's softmax, another row
    the softmax of a copy of the module loaded with the global parameters plus that update."""
    checked = []
    original = REGISTRY["deepsight"].accepted

    def spy(self, x):
        loop = self.server.model_outputs.__self__  # the bound method's loop
        probe = torch.rand(7, *self.server.input_shape, generator=torch.Generator().manual_seed(1))
        out = self.server.model_outputs(torch.stack([torch.zeros_like(x[0]), x[0]]), probe)
        copy = copy_module(loop.module)
        start = torch.nn.utils.parameters_to_vector(copy.parameters()).detach()
        with torch.no_grad():
            direct = copy(probe).softmax(-1)
            torch.nn.utils.vector_to_parameters(start + x[0], copy.parameters())
            moved = copy(probe).softmax(-1)
        assert self.server.input_shape == tuple(loop.train_x.shape[1:]) and out.shape == (2, 7, 10)
        assert_close(out[0], direct) and assert_close(out[1], moved)
        assert not torch.allclose(out[0], out[1])
        checked.append(True)
        return original(self, x)

    monkeypatch.setattr(REGISTRY["deepsight"], "accepted", spy)
    run_arm(load_config(None, [*TINY]), "deepsight")
    assert len(checked) == 4


def copy_module(module):
    import copy

    return copy.deepcopy(module).eval()


def test_deepsight_removes_backdoor_attackers_on_the_digits_and_not_label_flippers():
    backdoor = run_arm(load_config("configs/digits.yaml", DIGITS), "deepsight").metrics
    assert backdoor["detection_rate"] == 1.0 and backdoor["false_positive_rate"] == 0.0
    assert backdoor["attack_success_rate"] < 0.05
    # label flipping changes one class of the attackers' data: their updates still touch every class (high
    # threshold exceedings), nobody is labelled suspicious enough to reject a cluster
    flipping = run_arm(load_config("configs/digits.yaml", ["attack.name=label_flip", *DIGITS[1:]]), "deepsight")
    assert flipping.metrics["detection_rate"] < 0.2


def test_deepsight_is_reproducible_and_decides_for_rounds_of_few_users():
    cfg = load_config(None, [*TINY, "attack.name=backdoor"])
    assert run_arm(cfg, "deepsight").metrics == run_arm(cfg, "deepsight").metrics
    layout = (ParameterSlice("out.weight", 0, 6, (3, 2)), ParameterSlice("out.bias", 6, 9, (3,)))
    probabilities = lambda u, x: torch.softmax(u[:, None, :3].expand(-1, len(x), -1), -1)  # noqa: E731
    d = REGISTRY["deepsight"]
    defense = d(d.Params(), ServerInputs(layout=layout, model_outputs=probabilities, input_shape=(2,)))
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_close(defense.aggregate(Uploads(1, torch.arange(1), x[:1])).step, x[0])  # one upload: taken as it is
    for n in (2, 3, 4):  # fewer users than HDBSCAN's sizes: they shrink to the round's
        weights = defense.aggregate(Uploads(1, torch.arange(n), x[:n])).weights
        assert weights.shape == (n,) and ((weights == 0) | (weights == weights.max())).all()


@pytest.mark.parametrize("field, value, message", [
    ("tau", 0.0, "must be in (0, 1]"),
    ("threshold_factor", -0.1, "must be a finite number >= 0"),
    ("num_samples", 0, "must be an integer >= 1"),
    ("min_cluster_size", 1, "must be an integer >= 2"),
])
def test_deepsight_refuses_bad_parameters(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(f"defense.deepsight.{field}: {message}")):
        load_config(None, [f"defense.deepsight.{field}={value}"])
