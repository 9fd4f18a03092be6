import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from pipeline.defenses.clustering import two_means_1d


def sse(x: np.ndarray, upper: np.ndarray) -> float:
    return sum(((x[m] - x[m].mean()) ** 2).sum() for m in (upper, ~upper) if m.any())


def clustered(seed: int, num_features: int) -> tuple[np.ndarray, object]:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(num_features, 30))
    values[: num_features // 4, :6] += rng.uniform(0.5, 4, size=(num_features // 4, 1))  # planted minorities
    values = values.astype(np.float32).astype(np.float64)
    return values, two_means_1d(torch.tensor(values, dtype=torch.float32), chunk_size=300)


def test_never_worse_than_sklearn_kmeans_on_thousands_of_features():
    values, result = clustered(0, 2000)
    for f, x in enumerate(values):
        reference = KMeans(n_clusters=2, n_init=1, random_state=f).fit(x[:, None]).labels_.astype(bool)
        ours = result.upper[f].numpy()
        assert sse(x, ours) <= sse(x, reference) + 1e-9, f"feature {f}: worse than KMeans"
        assert result.low[f] == pytest.approx(x[~ours].mean(), abs=1e-5)
        assert result.high[f] == pytest.approx(x[ours].mean(), abs=1e-5)
        assert result.low[f] <= result.high[f]


def test_same_partition_as_restarted_sklearn_kmeans():
    values, result = clustered(1, 300)
    same = 0
    for f, x in enumerate(values):
        reference = KMeans(n_clusters=2, n_init=10, random_state=0).fit(x[:, None]).labels_.astype(bool)
        ours = result.upper[f].numpy()
        same += bool((ours == reference).all() or (ours == ~reference).all())
        assert sse(x, ours) <= sse(x, reference) + 1e-9
    assert same >= 0.9 * len(values)


def test_missing_values_are_clustered_out():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(200, 12))
    missing = rng.random(values.shape) < 0.3
    with_nan = np.where(missing, np.nan, values)
    result = two_means_1d(torch.tensor(with_nan, dtype=torch.float32))
    for f in range(len(values)):
        present = ~missing[f]
        upper = result.upper[f].numpy()
        assert not upper[missing[f]].any(), "a missing value was put in a cluster"
        if present.sum() < 2:
            assert np.isnan(result.low[f]) and np.isnan(result.high[f])
            continue
        alone = two_means_1d(torch.tensor(values[f, present][None], dtype=torch.float32))
        assert (upper[present] == alone.upper[0].numpy()).all()
        assert result.low[f] == pytest.approx(float(alone.low[0]))


def test_constant_feature_has_equal_centres_and_chunking_does_not_matter():
    values = torch.randn(1000, 7)
    values[3] = 2.5
    whole, chunked = two_means_1d(values, chunk_size=4096), two_means_1d(values, chunk_size=17)
    assert whole.low[3] == whole.high[3] == 2.5
    assert torch.equal(whole.upper, chunked.upper)
    assert torch.equal(whole.low, chunked.low) and torch.equal(whole.high, chunked.high)


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        two_means_1d(torch.zeros(5))


def best_split_sse(x: np.ndarray) -> float:
    """Brute force: the lowest within-cluster SSE over every split of the sorted values."""
    s = np.sort(x)
    return min(sse(s, np.arange(len(s)) >= k) for k in range(1, len(s)))


def test_ties_and_missing_values_match_brute_force_and_centres():
    rng = np.random.default_rng(2)
    values = rng.integers(0, 4, size=(600, 9)).astype(np.float64)  # many ties, constant rows too
    values[:20] = 1.5
    values[rng.random(values.shape) < 0.2] = np.nan
    result = two_means_1d(torch.tensor(values, dtype=torch.float32), chunk_size=64)
    for f, row in enumerate(values):
        present = ~np.isnan(row)
        upper = result.upper[f].numpy()
        assert not upper[~present].any()
        if present.sum() < 2:
            assert np.isnan(result.low[f]) and np.isnan(result.high[f])
            continue
        x, up = row[present], upper[present]
        assert 0 < up.sum() < len(x), "both clusters hold a value"
        assert sse(x, up) <= best_split_sse(x) + 1e-9
        assert result.low[f] == pytest.approx(x[~up].mean(), abs=1e-6)
        assert result.high[f] == pytest.approx(x[up].mean(), abs=1e-6)


def test_chunks_threads_layout_and_dtype_do_not_change_the_result():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(3000, 11)).astype(np.float32)
    values[:300] = np.round(values[:300])  # ties
    values[rng.random(values.shape) < 0.1] = np.nan
    reference = two_means_1d(torch.tensor(values))
    variants = [
        two_means_1d(torch.tensor(values), chunk_size=7, num_threads=1),
        two_means_1d(torch.tensor(values), chunk_size=500, num_threads=3),
        two_means_1d(torch.tensor(values.T.copy()).T),  # a transposed view, as Auror passes it
        two_means_1d(torch.tensor(values, dtype=torch.float64)),  # sorts in float64: same values, same result
    ]
    for result in variants:
        assert torch.equal(result.upper, reference.upper)
        assert torch.equal(result.low, reference.low) and torch.equal(result.high, reference.high)


def test_torch_path_for_other_devices_matches_the_numpy_path():
    # the CUDA path runs the same steps in torch; run them on CPU here
    from pipeline.defenses.clustering import _chunk_torch

    rng = np.random.default_rng(4)
    values = rng.normal(size=(2000, 13)).astype(np.float32)
    values[:200] = np.round(values[:200])
    values[:50] = 0.25
    values[rng.random(values.shape) < 0.15] = np.nan
    expected = two_means_1d(torch.tensor(values))
    upper, low, high = _chunk_torch(torch.tensor(values))
    assert torch.equal(upper, expected.upper)
    torch.testing.assert_close(low.float(), expected.low, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(high.float(), expected.high, equal_nan=True, rtol=0, atol=0)


def test_single_user_or_no_feature():
    one = two_means_1d(torch.randn(5, 1))
    assert not one.upper.any() and torch.isnan(one.low).all() and torch.isnan(one.high).all()
    assert two_means_1d(torch.zeros(0, 4)).upper.shape == (0, 4)
