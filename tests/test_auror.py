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


def reference_fit(updates: np.ndarray, alpha: float, tau: float, alpha_mode: str = "absolute"):
    """AUROR's rule written out feature by feature: every feature clustered (scikit-learn's KMeans is the
    reference of the clustering: tests/test_clustering.py), the indicative ones by their centre distance,
    and each user's score over the indicative features it uploaded. Returns (scores, flagged, indicative)."""
    import torch

    from pipeline.defenses.clustering import two_means_1d

    clusters = two_means_1d(torch.as_tensor(updates.T, dtype=torch.float32))
    distance = torch.nan_to_num(clusters.high - clusters.low, nan=0.0).numpy()
    threshold = alpha if alpha_mode == "absolute" else float(np.quantile(distance, alpha))
    in_minority, uploaded = np.zeros(len(updates)), np.zeros(len(updates))
    for j in np.flatnonzero(distance > threshold):
        present = ~np.isnan(updates[:, j])
        upper = clusters.upper[j].numpy()
        lower = present & ~upper
        if upper.sum() != lower.sum():  # on a tie neither cluster is suspicious
            in_minority += upper if upper.sum() < lower.sum() else lower
        uploaded += present
    scores = in_minority / np.maximum(uploaded, 1)
    return scores, scores > tau, distance > threshold


def masked(updates: np.ndarray, share: float, seed: int) -> np.ndarray:
    """``updates`` with a random ``share`` of each user's values not uploaded (NaN), as DSSGD leaves them."""
    out = updates.copy()
    out[np.random.default_rng(seed).random(out.shape) < share] = np.nan
    return out


CASES = {
    "planted": (synthetic_updates(), 0.1, 0.5, "absolute"),
    "no attacker": (synthetic_updates(planted=()), 0.1, 0.5, "absolute"),
    "quantile": (synthetic_updates(), 0.98, 0.5, "quantile"),
    "masked 70%": (masked(synthetic_updates(seed=3), 0.7, 0), 0.1, 0.5, "absolute"),
    "masked, quantile": (masked(synthetic_updates(seed=4), 0.5, 1), 0.9, 0.3, "quantile"),
    "alpha 0, ties": (np.round(synthetic_updates(seed=5) * 20) / 20, 0.0, 0.2, "absolute"),
    "spans of exactly alpha": (np.tile([[0.0], [0.0], [0.25]], (4, 300)) * np.arange(1, 301) / 200, 0.25, 0.4, "absolute"),
}


@pytest.mark.parametrize("case", CASES)
def test_flags_and_scores_equal_the_rule_written_out(case):
    updates, alpha, tau, mode = CASES[case]
    scores, flagged, indicative = reference_fit(updates, alpha, tau, mode)
    d = Auror(alpha=alpha, tau=tau, alpha_mode=mode, chunk_size=512).fit(updates)
    assert np.array_equal(d.scores_, scores) and np.array_equal(d.flagged_, flagged)
    assert np.array_equal(d.indicative_, indicative)
    assert indicative.any() or case == "no attacker"


def test_only_features_spanning_more_than_alpha_are_clustered():
    """Absolute mode: a feature whose values span at most alpha cannot be indicative; its distance is NaN
    (not computed), the others' are the clustering's."""
    updates = synthetic_updates()
    d = Auror(alpha=0.1, tau=0.5).fit(updates)
    span = np.nanmax(updates, 0) - np.nanmin(updates, 0)
    assert np.array_equal(np.isnan(d.centre_distance_), span <= 0.1)
    full = Auror(alpha=0.98, tau=0.5, alpha_mode="quantile").fit(updates).centre_distance_
    clustered = span > 0.1
    assert np.array_equal(d.centre_distance_[clustered], full[clustered])
    assert (full[~clustered] <= 0.1).all()


@pytest.mark.parametrize("rounds", [1, 2, 3, 5])
@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_the_window_mean_is_nanmean_to_the_bit(rounds, missing):
    import torch

    from pipeline.defenses.auror import window_mean

    g = torch.Generator().manual_seed(rounds)
    window = torch.randn(rounds, 7, 3000, generator=g) * torch.logspace(-6, 2, 3000)
    window[0, 0, :5] = torch.tensor([0.0, -0.0, 1e-45, 3e38, -3e38])
    if missing:
        window[torch.rand(window.shape, generator=g) < missing] = float("nan")
        window[:, 3] = float("nan")  # a user absent from every round of the window
    expected = window.nanmean(0)
    assert torch.equal(window_mean(window).view(torch.int32), expected.view(torch.int32))
