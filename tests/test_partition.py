import numpy as np
import pytest

from datamodules.users import dirichlet_partition

LABELS = np.repeat(np.arange(10), 300)  # 10 classes x 300 samples


def class_shares(parts):
    counts = np.array([np.bincount(LABELS[p], minlength=10) for p in parts])
    return counts / counts.sum(1, keepdims=True)


def test_every_sample_lands_in_exactly_one_sorted_part():
    labels = np.random.default_rng(0).integers(0, 4, size=1001)
    parts = dirichlet_partition(labels, 7, 0.5, 0, np.random.default_rng(1))
    assert len(parts) == 7
    assert sorted(np.concatenate(parts).tolist()) == list(range(1001))
    assert all((np.diff(p) > 0).all() for p in parts)


def test_same_seed_same_partition_other_seed_other_partition():
    a, b, c = (dirichlet_partition(LABELS, 5, 1.0, 0, np.random.default_rng(s)) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_small_concentration_gives_skewed_label_distributions():
    shares = class_shares(dirichlet_partition(LABELS, 10, 0.1, 0, np.random.default_rng(0)))
    # how many classes each user needs to cover 90% of its samples
    classes_for_90 = [(np.cumsum(np.sort(s)[::-1]) < 0.9).sum() + 1 for s in shares]
    assert np.median(classes_for_90) <= 3


def test_large_concentration_gives_near_iid_shares():
    parts = dirichlet_partition(LABELS, 10, 1000.0, 0, np.random.default_rng(0))
    assert np.abs(class_shares(parts) - 0.1).max() < 0.02
    assert all(abs(len(p) - 300) < 15 for p in parts)


def test_too_few_samples_raises_a_helpful_error():
    with pytest.raises(ValueError, match=r"each of 100 draws left a user fewer than min_samples=20 samples \(at best "
                                         r"\d+\); raise the concentration"):
        dirichlet_partition(LABELS[:200], 50, 0.1, 20, np.random.default_rng(0))
    assert len(dirichlet_partition(LABELS, 10, 1000.0, 250, np.random.default_rng(0))) == 10


def first_draw_fewest(seed: int) -> int:
    return min(len(p) for p in dirichlet_partition(LABELS, 20, 0.5, 0, np.random.default_rng(seed)))


def test_a_draw_leaving_a_user_too_few_samples_is_drawn_again_and_a_passing_first_draw_is_kept():
    fewest = [first_draw_fewest(seed) for seed in range(20)]
    failing = next(seed for seed, f in enumerate(fewest) if f < 20)
    passing = next(seed for seed, f in enumerate(fewest) if f >= 20)
    redrawn = dirichlet_partition(LABELS, 20, 0.5, 20, np.random.default_rng(failing))
    assert min(len(p) for p in redrawn) >= 20
    assert sorted(np.concatenate(redrawn).tolist()) == list(range(len(LABELS)))
    kept = dirichlet_partition(LABELS, 20, 0.5, 20, np.random.default_rng(passing))
    first = dirichlet_partition(LABELS, 20, 0.5, 0, np.random.default_rng(passing))
    assert all(np.array_equal(a, b) for a, b in zip(kept, first))  # min_samples changes no partition that passes
