import numpy as np
import pytest

from pipeline.defenses.auror import Auror


def synthetic_updates(num_users=20, num_features=5000, planted=(2, 11, 17), seed=0):
    """Honest users: noise around a shared mean. Planted users: shifted on a few indicative features."""
    rng = np.random.default_rng(seed)
    updates = rng.normal(0.0, 0.01, size=(num_users, num_features)) + rng.normal(0, 0.05, size=num_features)
    shifted = rng.choice(num_features, size=200, replace=False)
    for user in planted:
        updates[user, shifted] += 0.2
    return updates


def test_flags_exactly_the_planted_users():
    d = Auror(alpha=0.1, tau=0.5).fit(synthetic_updates())
    assert d.flagged_.nonzero()[0].tolist() == [2, 11, 17]
    assert d.indicative_.sum() == 200
    assert d.scores_[[2, 11, 17]].min() == 1.0


def test_flags_nobody_when_all_users_are_honest():
    d = Auror(alpha=0.1, tau=0.5).fit(synthetic_updates(planted=()))
    assert not d.flagged_.any()
    assert d.indicative_.sum() == 0


def test_quantile_alpha_flags_the_planted_users():
    d = Auror(alpha=0.98, tau=0.5, alpha_mode="quantile").fit(synthetic_updates())
    assert d.threshold_ == pytest.approx(np.quantile(d.centre_distance_, 0.98))
    assert d.flagged_.nonzero()[0].tolist() == [2, 11, 17]


def test_users_missing_a_feature_are_not_scored_on_it():
    updates = synthetic_updates()
    updates[5, :2500] = np.nan  # user 5 uploaded only half of the features
    d = Auror(alpha=0.1, tau=0.5).fit(updates)
    assert d.flagged_.nonzero()[0].tolist() == [2, 11, 17]


def test_tie_between_clusters_makes_nobody_suspicious():
    updates = np.array([[0.0], [0.0], [1.0], [1.0]])
    d = Auror(alpha=0.5, tau=0.0).fit(updates)
    assert d.indicative_.tolist() == [True]
    assert d.scores_.tolist() == [0.0] * 4 and not d.flagged_.any()


@pytest.mark.parametrize(
    "kwargs, updates, message",
    [
        ({"tau": 1.5}, np.zeros((3, 2)), "tau"),
        ({"alpha_mode": "median"}, np.zeros((3, 2)), "alpha_mode"),
        ({}, np.zeros((1, 5)), "users >= 2"),
        ({}, np.array([[np.inf, 0.0], [0.0, 0.0]]), "Inf"),
    ],
)
def test_bad_input_is_rejected_at_fit(kwargs, updates, message):
    with pytest.raises(ValueError, match=message):
        Auror(**kwargs).fit(updates)


def test_scores_do_not_depend_on_the_chunk_size():
    updates = synthetic_updates(num_features=3000)
    updates[4, ::3] = np.nan
    whole = Auror(alpha=0.1, tau=0.5, chunk_size=10_000).fit(updates)
    chunked = Auror(alpha=0.1, tau=0.5, chunk_size=7).fit(updates)
    np.testing.assert_array_equal(chunked.scores_, whole.scores_)
    np.testing.assert_array_equal(chunked.flagged_, whole.flagged_)
