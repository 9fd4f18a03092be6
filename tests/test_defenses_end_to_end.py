"""Every registered defense as an arm of a real (tiny) run."""

import math

import mlflow
import pytest
import torch
from torch.nn.utils import parameters_to_vector

import pipeline.experiment.arms as arms_module
from datamodules.digits import DigitsDataModule
from lightning_modules.cnn import CNNClassifier
from pipeline.defenses import REGISTRY
from pipeline.defenses.compose import defense_class
from pipeline.experiment.cli import main
from pipeline.experiment.config import load_config
from pipeline.experiment.arms import ARMS, build_datamodule, run_arm
from tests.conftest import TINY

DEFENSES = [name for name, d in REGISTRY.items() if name != "none" and not d.pre_aggregator]
COMPOSED = ["nnm+median", "bucketing+krum"]  # each pre-aggregator in front of a rule


def test_every_registered_defense_is_an_arm():
    assert list(ARMS) == ["benign", "attack", *DEFENSES]
    assert {name for name, d in REGISTRY.items() if d.pre_aggregator} == {"nnm", "bucketing"}
    assert {"auror", "auror_output_layer", "krum", "multi_krum", "median", "trimmed_mean", "bulyan",
            "norm_clipping", "foolsgold", "fltrust", "flame"} <= set(DEFENSES)


@pytest.mark.parametrize("defense", DEFENSES + COMPOSED)
def test_each_defense_trains_a_finite_model_and_reports_by_its_kind(defense):
    cfg = load_config(None, TINY)
    result = run_arm(cfg, defense)
    assert torch.isfinite(parameters_to_vector(result.module.parameters())).all()
    assert 0 <= result.metrics["accuracy"] <= 1 and 0 <= result.metrics["attack_success_rate"] <= 1
    assert result.detection["defense"] == defense
    dr, fpr = result.metrics["detection_rate"], result.metrics["false_positive_rate"]
    flags = defense_class(defense).flags
    if flags == "none":  # a robust aggregator (or a composed arm) flags nobody: DR and FPR are '-'
        assert dr is None and fpr is None
    else:
        assert 0 <= dr <= 1 and 0 <= fpr <= 1
    if flags == "round":
        assert len(result.detection["excluded_per_round"]) == cfg.training.rounds
        excluded = [len(ids) for ids in result.detection["excluded_per_round"]]
        assert [h["excluded_users"] for h in result.history] == excluded


def test_the_same_seed_gives_the_same_metrics_for_a_randomised_defense():
    cfg = load_config(None, TINY)  # FLAME adds seeded noise, FoolsGold keeps state across rounds
    for defense in ("flame", "foolsgold"):
        assert run_arm(cfg, defense).metrics == run_arm(cfg, defense).metrics


def test_fltrust_root_set_is_held_out_of_every_users_data():
    cfg = load_config(None, TINY)
    size = cfg.defense.fltrust.root_size
    data = build_datamodule(cfg, poison=True, root_size=size)
    plain = build_datamodule(cfg, poison=True)
    root = set(data.root_indices.tolist())
    assert len(root) == size and len(plain.root_indices) == 0
    users = [set(i.tolist()) for i in data.user_indices]
    assert all(not (u & root) for u in users)
    # the split is otherwise the same: each user lost exactly its root samples
    assert all(u == set(p.tolist()) - root for u, p in zip(users, plain.user_indices))
    assert data.malicious.equal(plain.malicious)


def test_per_round_detection_rate_is_the_mean_over_rounds():
    from pipeline.core.metrics import defense_detection_rates

    malicious = torch.tensor([True, True, False, False])
    # round 1 excludes one attacker, round 2 both and one honest user
    dr, fpr = defense_detection_rates("round", set(), [[0], [0, 1, 2]], malicious)
    assert math.isclose(dr, (0.5 + 1.0) / 2) and math.isclose(fpr, (0 + 0.5) / 2)
    assert defense_detection_rates("run", {1}, [[0], [0, 1, 2]], malicious) == (0.5, 0.0)
    assert defense_detection_rates("none", set(), [], malicious) == (None, None)


def test_cli_runs_defense_arms_each_in_its_own_tagged_mlflow_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    arms = ["benign", "attack", "krum", "median"]
    code = main(["run", "--arms", *arms, *(f"--set={o}" for o in TINY)])
    assert code == 0
    table = capsys.readouterr().out
    median_row = next(line for line in table.splitlines() if line.startswith("median"))
    assert median_row.split()[-2:] == ["-", "-"]  # DR and FPR of a robust aggregator
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["auror"], output_format="list")
    tags = {r.data.tags["arm"]: r.data.tags for r in runs}
    assert sorted(tags) == sorted(arms)
    assert {arm: t["defense"] for arm, t in tags.items()} == {"benign": "none", "attack": "none", "krum": "krum",
                                                              "median": "median"}
    assert all(arm in r.info.run_name for r in runs for arm in [r.data.tags["arm"]])
    krum = next(r for r in runs if r.data.tags["arm"] == "krum")
    assert "defense.krum.byzantine_fraction" in krum.data.params
    assert not any(k.startswith("defense.auror.") for k in krum.data.params)  # only its own defense's params


def test_defenses_command_lists_every_registered_defense(capsys):
    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    for name, defense in REGISTRY.items():
        assert f"{name}" in out and defense.summary in out


class DigitsAsImages(DigitsDataModule):
    """The digits as 1 x 16 x 16 images (each pixel doubled), for a convolutional net."""

    num_features = 256

    def load_arrays(self):
        arrays = super().load_arrays()
        up = [x.reshape(-1, 8, 8).repeat(2, axis=1).repeat(2, axis=2).reshape(len(x), -1) for x in arrays[::2]]
        return up[0], arrays[1], up[1], arrays[3]


@pytest.mark.parametrize("defense", DEFENSES + COMPOSED)
def test_each_defense_runs_with_a_convolutional_net(defense, monkeypatch):
    """The CNN's layout (conv and linear layers; per-user training through functional_call, FLTrust's
    root update included) works with every defense, as on GTSRB."""
    monkeypatch.setitem(arms_module.DATAMODULES, "digits",
                        lambda cfg, **kw: DigitsAsImages(test_fraction=cfg.data.test_fraction, **kw))
    monkeypatch.setitem(arms_module.MODELS, "mlp",
                        lambda cfg, data: CNNClassifier(10, input_shape=(1, 16, 16), channels=(4, 8), hidden_size=16))
    cfg = load_config(None, [*TINY, "training.rounds=2", "data.test_fraction=0.8"])  # 72 samples a user: quick
    result = run_arm(cfg, defense)
    assert torch.isfinite(parameters_to_vector(result.module.parameters())).all()
    assert result.detection["defense"] == defense and len(result.history) == 2
