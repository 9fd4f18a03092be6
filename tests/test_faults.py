"""Faulty users (NaN, Inf, dropout, huge updates): the server's guards keep
the global model finite and count every fault per round."""

import math

import mlflow
import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from pipeline.defenses.auror import Auror
from pipeline.experiment.config import ConfigError, FaultsConfig, load_config
from pipeline.experiment.arms import run_arm
from pipeline.experiment.run import run_experiment
from pipeline.core.faults import inject_faults, screen_uploads
from tests.conftest import TINY

NAN, INF = float("nan"), float("inf")


def test_screen_leaves_out_inf_and_outlying_norms_and_counts_missing_values():
    updates = torch.tensor([
        [0.1, -0.2, 0.1, 0.0],
        [0.2, 0.1, -0.1, 0.1],
        [0.1, INF, 0.0, 0.1],  # Inf: left out
        [1e4, -1e4, 1e4, 1e4],  # RMS 1e4, the median is ~0.1: left out
        [NAN, NAN, NAN, NAN],  # uploaded nothing
        [0.1, NAN, -0.1, NAN],  # uploaded half of its quota
    ])
    s = screen_uploads(updates, expected=4, max_norm_ratio=100)
    assert s.infinite.tolist() == [False, False, True, False, False, False]
    assert s.outlier.tolist() == [False, False, False, True, False, False]
    assert s.dropped.tolist() == [False, False, False, False, True, False]
    assert s.incomplete.tolist() == [False, False, False, False, False, True]
    assert torch.isnan(s.updates[[2, 3]]).all() and torch.equal(s.updates[[0, 1]], updates[[0, 1]])
    assert not screen_uploads(updates, 4, math.inf).outlier.any()  # .inf: no norm guard


def test_screen_returns_the_uploads_themselves_when_nobody_is_faulty():
    updates = torch.randn(6, 50)
    s = screen_uploads(updates, expected=50, max_norm_ratio=100)
    assert s.updates is updates and not (s.faulty | s.dropped | s.incomplete).any()


def test_inject_faults_only_touches_the_faulty_users_in_their_rounds():
    uploads = torch.randn(5, 40)
    faults = FaultsConfig(nan_users=[0], inf_users=[1], dropout_users=[2], huge_users=[3], rounds=[2])
    assert inject_faults(uploads, faults, 1, torch.Generator().manual_seed(0)) is uploads  # not a faulty round
    sent = inject_faults(uploads, faults, 2, torch.Generator().manual_seed(0))
    assert 0 < torch.isnan(sent[0]).sum() < 40 and 0 < torch.isinf(sent[1]).sum() < 40
    assert torch.isnan(sent[2]).all() and torch.equal(sent[3], uploads[3] * 1e6) and torch.equal(sent[4], uploads[4])


def test_auror_gives_a_user_with_no_uploaded_feature_score_0():
    updates = np.zeros((6, 4))
    updates[0] = 1.0  # differs on every feature
    updates[5] = np.nan  # absent: no feature at all
    d = Auror(alpha=0.5, tau=0.5).fit(updates)
    assert d.flagged_.nonzero()[0].tolist() == [0] and d.scores_[5] == 0


@pytest.mark.parametrize("fault, counter", [
    ("nan_users=[0]", "incomplete_users"),
    ("inf_users=[1]", "faulty_users"),
    ("dropout_users=[2]", "dropped_users"),
    ("huge_users=[3]", "faulty_users"),
])
def test_a_faulty_user_is_counted_and_the_model_stays_finite(fault, counter):
    cfg = load_config(None, [*TINY, f"faults.{fault}", "faults.rounds=[1,2,3]"])
    result = run_arm(cfg, "auror")  # AUROR sees the server's sanitised view: Inf would make it raise
    assert torch.isfinite(parameters_to_vector(result.module.parameters())).all()
    assert [h[counter] for h in result.history] == [1, 1, 1, 0]  # rounds 1-3 only
    assert 0 <= result.metrics["accuracy"] <= 1 and result.detection["detection_round"] == 2
    if counter == "faulty_users":  # left out of aggregation too
        assert all(h["excluded_users"] >= h["faulty_users"] for h in result.history)


def test_everybody_dropping_out_leaves_the_model_unchanged_and_is_logged_to_mlflow(tiny_config):
    cfg = load_config(None, [*TINY, "faults.dropout_users=[0,1,2,3,4]", "faults.rounds=[2]",
                             *(f"tracking.{k}={getattr(tiny_config.tracking, k)}"
                               for k in ("tracking_uri", "artifact_dir", "reports_dir"))])
    run_experiment(cfg, arms=["auror"])
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    (run,) = mlflow.search_runs(experiment_names=["auror"], output_format="list")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "dropped_users")
    assert [(m.step, m.value) for m in history] == [(1, 0), (2, 5), (3, 0), (4, 0)]
    accuracy = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "accuracy")}
    assert accuracy[2] == accuracy[1]  # nothing uploaded in round 2: the global model did not move


def test_fault_config_is_validated():
    with pytest.raises(ConfigError, match=r"faults.nan_users: must be user ids in \[0, users.num_users=5\)"):
        load_config(None, [*TINY, "faults.nan_users=[5]"])
    with pytest.raises(ConfigError, match="faults.inf_users: user 1 is already in faults.nan_users"):
        load_config(None, [*TINY, "faults.nan_users=[1]", "faults.inf_users=[1]"])
