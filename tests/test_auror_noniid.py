"""The label-skew detector (auror_noniid) on synthetic output-layer updates with skewed honest
users, by hand, and on the digits data (a real Dirichlet split, a real label-flipping attack)."""

import json

import numpy as np
import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.server import ParameterSlice, ServerInputs, Uploads
from pipeline.defenses.auror_noniid import (AurorNonIID, AurorNonIIDParams, class_alignment, flag_opposed,
                                            opposition, output_weight)
from pipeline.experiment.config import load_config
from pipeline.experiment.diagnose import effective_attackers

CLASSES, HIDDEN = 10, 32
# a model whose last layer is classes x hidden (+ bias), after one hidden layer of 4 x hidden
LAYOUT = (ParameterSlice("net.0.weight", 0, 4 * HIDDEN, (HIDDEN, 4)),
          ParameterSlice("net.2.weight", 4 * HIDDEN, 4 * HIDDEN + CLASSES * HIDDEN, (CLASSES, HIDDEN)),
          ParameterSlice("net.2.bias", 4 * HIDDEN + CLASSES * HIDDEN, 4 * HIDDEN + CLASSES * HIDDEN + CLASSES,
                         (CLASSES,)))
SOURCE, TARGET = 1, 7


def skewed_round(seed: int, attackers: int, honest: int = 21, dirichlet: float = 0.5, boost: float = 3.0,
                 data_seed: int = 0):
    """One round of output-layer updates as cross-entropy shapes them once the model fits the data
    (a sample of class y whose features are f_y moves row c by (1[c = y] - p_c) f_y): each user's
    class counts are a Dirichlet(``dirichlet``) draw; a correctly labelled sample is predicted right
    with p = 0.9 (a small pull on its own row, small pushes on the others, larger on a confusable
    class: 9 with 4, 7 with 1). Attackers label their source samples as the target: the model still
    predicts the source on them (p = 0.9), so the source row is pushed hard away from the source's
    features and the target row pulled towards them; their uploads are boosted. The users' data
    (``data_seed``) is the same every round; the round's noise (``seed``) is not."""
    rng = np.random.default_rng(data_seed)
    features = rng.normal(size=(CLASSES, HIDDEN))  # the hidden layer's (tanh) activations on each class
    predicted = np.full((CLASSES, CLASSES), 0.1 / 12)  # [c, k]: p_c on a sample of class k
    predicted[9, 4] = predicted[4, 9] = predicted[7, 1] = predicted[1, 7] = 0.1 / 12 * 4
    np.fill_diagonal(predicted, 0.9)
    n = honest + attackers
    counts = np.stack([rng.multinomial(600, rng.dirichlet([dirichlet] * CLASSES)) for _ in range(n)])
    labels = counts.copy()
    labels[honest:, TARGET] += labels[honest:, SOURCE]
    labels[honest:, SOURCE] = 0
    rows = np.zeros((n, CLASSES, HIDDEN))
    for u in range(n):
        for k in range(CLASSES):  # the correctly labelled samples of class k
            rows[u] += (labels[u, k] if k != TARGET or u < honest else counts[u, k]) * (
                np.eye(CLASSES)[:, k] - predicted[:, k])[:, None] * features[k]
        if u >= honest:  # the flipped samples: source features, target label
            flipped = counts[u, SOURCE]
            rows[u] += flipped * (np.eye(CLASSES)[:, TARGET] - predicted[:, SOURCE])[:, None] * features[SOURCE]
            rows[u] *= boost
    rng = np.random.default_rng(seed)
    rows += rng.normal(scale=0.5, size=rows.shape)
    hidden = rng.normal(size=(n, 4 * HIDDEN))
    updates = np.concatenate([hidden, rows.reshape(n, -1), np.zeros((n, CLASSES))], axis=1)
    return torch.tensor(updates, dtype=torch.float32), counts


def run_rounds(rounds: int, attackers: int, params=None, seed: int = 0):
    defense = AurorNonIID(params or AurorNonIIDParams(), ServerInputs(layout=LAYOUT))
    for r in range(1, rounds + 1):
        updates, counts = skewed_round(r, attackers, data_seed=seed)
        aggregate = defense.aggregate(Uploads(r, torch.arange(len(updates)), updates))
    return defense, aggregate, counts


def test_output_weight_is_the_last_matrix():
    assert output_weight(LAYOUT).name == "net.2.weight"


def test_alignment_matches_a_numpy_reference_and_ignores_each_users_scale():
    rows = torch.randn(7, CLASSES, HIDDEN, generator=torch.Generator().manual_seed(1))
    x = rows.double().numpy()
    x = x / np.linalg.norm(x.reshape(7, -1), axis=1)[:, None, None]
    consensus = np.sort(x, axis=0)[3]  # the median of 7
    expected = np.einsum("uch,ch->uc", x, consensus / np.linalg.norm(consensus, axis=1, keepdims=True))
    np.testing.assert_allclose(class_alignment(rows).numpy(), expected, atol=1e-12)
    scaled = rows.clone()
    scaled[2] *= 50  # a boosted upload
    torch.testing.assert_close(class_alignment(scaled)[2], class_alignment(rows)[2])


def test_suspect_class_is_the_most_opposed():
    alignment = torch.tensor([[0.5, 0.1], [0.4, -0.3], [0.6, -0.9], [-0.2, 0.2]], dtype=torch.float64)
    assert opposition(alignment).tolist() == pytest.approx([0.2, 1.2])
    suspect, flagged = flag_opposed(alignment, margin=0.25)
    assert suspect == 1
    assert flagged.tolist() == [False, True, True, False]  # user 3 opposes class 0, not the suspect


def test_a_user_is_judged_by_its_history_not_its_last_round():
    # rounds 1-3: users 0-5 pull row 0 towards e; user 6 pushes it away; round 4: user 6 uploads
    # what the others do (one round of looking honest does not undo three of opposing)
    e = torch.zeros(CLASSES, HIDDEN)
    e[0, 0], e[1, 1] = 1.0, 1.0
    defense = AurorNonIID(AurorNonIIDParams(margin=0.05, window_rounds=3), ServerInputs(layout=LAYOUT))
    for r in range(1, 5):
        rows = e.repeat(7, 1, 1)
        if r < 4:
            rows[6, 0] = -e[0]
        updates = torch.cat([torch.zeros(7, 4 * HIDDEN), rows.flatten(1), torch.zeros(7, CLASSES)], dim=1)
        defense.aggregate(Uploads(r, torch.arange(7), updates))
        assert defense.flagged == ({6} if r >= 3 else set())
    assert defense.detection["suspect_class"] == 0


def test_skewed_honest_users_are_not_flagged_and_planted_attackers_are():
    defense, aggregate, counts = run_rounds(rounds=5, attackers=9)
    assert defense.detection["suspect_class"] == SOURCE
    holders = {u for u in range(21, 30) if counts[u, SOURCE] >= 20}  # attackers with something to flip
    assert len(holders) >= 5 and holders <= defense.flagged <= set(range(21, 30))
    # the honest users differ: several hold no sample of some class, and some none of the source
    assert (counts[:21] == 0).any(axis=1).sum() >= 5
    assert aggregate.weights[sorted(defense.flagged)].eq(0).all() and aggregate.weights[:21].gt(0).all()


def test_no_attacker_no_flag_on_skewed_honest_users():
    defense, aggregate, _ = run_rounds(rounds=5, attackers=0)
    assert defense.flagged == set()
    assert aggregate.weights.gt(0).all()


def test_nobody_is_flagged_before_the_window_ends():
    defense, aggregate, _ = run_rounds(rounds=2, attackers=9, params=AurorNonIIDParams(window_rounds=3))
    assert defense.flagged == set() and aggregate.weights.gt(0).all()


def test_state_dict_round_trip_gives_the_same_next_round():
    a, _, _ = run_rounds(rounds=2, attackers=9)
    b = AurorNonIID(AurorNonIIDParams(), ServerInputs(layout=LAYOUT))
    b.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()})
    updates, _ = skewed_round(3, attackers=9)
    step_a = a.aggregate(Uploads(3, torch.arange(30), updates)).step
    step_b = b.aggregate(Uploads(3, torch.arange(30), updates)).step
    torch.testing.assert_close(step_a, step_b)
    assert a.flagged == b.flagged


@pytest.mark.parametrize("key, value, message", [
    ("margin", -0.1, "defense.auror_noniid.margin: must be in [0, 1), got -0.1"),
    ("window_rounds", 0, "defense.auror_noniid.window_rounds: must be an integer >= 1, got 0"),
])
def test_bad_parameters_give_one_line_errors(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"defense.auror_noniid.{key}={value}"])
    assert str(err.value) == message


def test_effective_attackers_hold_a_changed_sample():
    malicious = torch.tensor([False, True, True, True])
    indices = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    poisoned = torch.tensor([False, False, True, False, False, False, True])
    assert effective_attackers(malicious, indices, poisoned, poisons_data=True).tolist() == [False, True, False, True]
    # an attack without a data side (IPM, ALIE...): every attacker counts
    assert effective_attackers(malicious, indices, poisoned, poisons_data=False).tolist() == malicious.tolist()


def test_on_digits_under_label_skew_it_flags_the_effective_attackers_and_no_honest_user():
    from pipeline.experiment.arms import build_datamodule, run_arm

    cfg = load_config("configs/digits.yaml", ["users.partition=dirichlet", "users.dirichlet_alpha=0.5"])
    data = build_datamodule(cfg, poison=True)
    effective = effective_attackers(data.malicious, data.user_indices, data.poisoned, poisons_data=True)
    result = run_arm(cfg, "auror_noniid")
    flagged = set(result.detection["flagged_users"])
    assert set(effective.nonzero().flatten().tolist()) <= flagged
    assert flagged <= set(data.malicious.nonzero().flatten().tolist())
    assert result.metrics["false_positive_rate"] == 0.0


def test_diagnose_reports_dr_over_effective_attackers_and_every_users_score(tmp_path, capsys):
    from pipeline.experiment.cli import main

    overrides = ["users.partition=dirichlet", "users.dirichlet_alpha=0.5", f"tracking.reports_dir={tmp_path}"]
    assert main(["diagnose", "--params", "configs/digits.yaml", "--seeds", "0",
                 *[arg for o in overrides for arg in ("--set", o)]]) == 0
    out = json.loads((tmp_path / "diagnose_digits.json").read_text())["seeds"]["0"]
    cfg = load_config("configs/digits.yaml", overrides)
    assert len(out["source_samples"]) == cfg.users.num_users
    # label flipping changes exactly the attackers' source samples; the effective ones hold some
    assert [out["changed_samples"][u] for u in out["malicious"]] == [out["source_samples"][u] for u in out["malicious"]]
    assert out["effective"] == [u for u in out["malicious"] if out["source_samples"][u] > 0]
    assert len(out["effective"]) < len(out["malicious"])  # this split leaves some attacker without a 1
    for defense in ("auror", "auror_noniid"):
        row = out["arms"][defense]
        assert len(row["scores"]) == cfg.users.num_users
        assert row["effective_detection_rate"] is not None
    assert out["arms"]["auror"]["num_indicative_features"] > 0
    assert out["arms"]["auror_noniid"]["suspect_class"] == cfg.attack.source_class
    md = (tmp_path / "diagnose_digits.md").read_text()
    assert "| arm | accuracy | AD | SR | DR | DR eff | FPR |" in md and "tracking." not in md
    assert (tmp_path / "diagnose_digits.png").stat().st_size > 10_000
