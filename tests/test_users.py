import numpy as np

from datamodules.digits import DigitsDataModule
from datamodules.users import choose_malicious, iid_partition, poison_targeted
from pipeline.attacks.base import UserData
from pipeline.attacks.label_flip import flip_labels


def test_iid_partition_covers_every_sample_exactly_once():
    parts = iid_partition(1347, 10, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1347))
    assert {len(p) for p in parts} == {134, 135}


def test_choose_malicious_count():
    mask = choose_malicious(30, 0.2, np.random.default_rng(0))
    assert mask.sum() == 6


def test_poisoning_relabels_exactly_the_expected_samples():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=600)
    users = iid_partition(600, 6, rng)
    malicious = np.array([True, False, True, False, False, False])
    poisoned, flipped = poison_targeted(labels, users, malicious, 1, 2, 0.5, np.random.default_rng(1))
    for user, indices in enumerate(users):
        source = indices[labels[indices] == 1]
        expected = round(0.5 * len(source)) if malicious[user] else 0
        assert flipped[indices].sum() == expected
        assert set(np.flatnonzero(flipped[indices])) <= set(np.flatnonzero(labels[indices] == 1))
    assert (poisoned[flipped] == 2).all()
    assert (poisoned[~flipped] == labels[~flipped]).all()


def make_digits(poison, seed=0, **overrides):
    """The digits users; with ``poison``, after the label_flip attack's data side (1 -> 7, every source sample)."""
    kw = dict(num_users=5, malicious_fraction=0.4, seed=seed)
    data = DigitsDataModule(**{**kw, **overrides})
    data.setup()
    if poison:
        poisoned = flip_labels(UserData(data.train_x, data.train_y, data.user_indices, data.malicious), 1, 7, 1.0,
                               data.poison_rng())
        data.train_y, data.poisoned = poisoned.y, poisoned.poisoned
    return data


def test_digits_datamodule_splits_and_poisons():
    clean, attacked = make_digits(poison=False), make_digits(poison=True)
    assert clean.train_x.shape[1] == 64 and 0 <= clean.train_x.min() and clean.train_x.max() <= 1
    assert len(clean.train_y) + len(clean.test_y) == 1797
    # the benign and attacked arms share the split and the malicious users
    assert all(torch_equal(a, b) for a, b in zip(clean.user_indices, attacked.user_indices))
    assert torch_equal(clean.malicious, attacked.malicious) and clean.malicious.sum() == 2
    assert not clean.poisoned.any() and torch_equal(clean.train_y, clean.clean_train_y)
    # every source-class sample of the malicious users, and nothing else, is relabelled
    owners = np.zeros(len(attacked.train_y), dtype=int)
    for user, idx in enumerate(attacked.user_indices):
        owners[idx.numpy()] = user
    expected = (attacked.clean_train_y.numpy() == 1) & attacked.malicious.numpy()[owners]
    assert (attacked.poisoned.numpy() == expected).all()
    assert (attacked.train_y[attacked.poisoned] == 7).all()
    assert len(attacked.user_dataset(0)) == len(attacked.user_indices[0])


def test_digits_datamodule_is_seeded():
    a, b, c = make_digits(True, seed=3), make_digits(True, seed=3), make_digits(True, seed=4)
    assert torch_equal(a.train_y, b.train_y) and torch_equal(a.malicious, b.malicious)
    assert not torch_equal(a.user_indices[0], c.user_indices[0])


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())
