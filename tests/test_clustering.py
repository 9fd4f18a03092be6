import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from pipeline.clustering import two_means_1d


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
