"""Divide-and-Conquer, SignGuard and the robust learning rate: hand-worked cases from the papers' rules,
independent numpy / scikit-learn computations, their seeded draws, validation, and real runs."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from pipeline.core.device import seeded_generator
from pipeline.core.errors import ConfigError
from pipeline.core.server import ServerInputs, Uploads
from pipeline.defenses import REGISTRY
from pipeline.defenses.dnc import DNC_STREAM, dnc_kept, outlier_scores, removed_count
from pipeline.defenses.rlr import agreement_threshold, robust_learning_rate
from pipeline.defenses.signguard import SIGNGUARD_STREAM, largest_sign_cluster, norm_filter, sign_features
from pipeline.experiment.arms import check_arms, run_arm
from pipeline.experiment.config import load_config
from tests.conftest import TINY

NAMES = ["dnc", "signguard", "rlr"]
DIGITS = "configs/digits.yaml"
F64 = torch.float64


def matrix(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make(name, seed=0, **params):
    cls = REGISTRY[name]
    return cls(cls.Params(**params), ServerInputs(layout=(), seed=seed))


def uploads(x, round_=1):
    return Uploads(round_, torch.arange(len(x)), x)


def t(rows):
    return torch.tensor(rows, dtype=F64)


# --- DnC -------------------------------------------------------------------------------------------------------

# four honest updates around 0 and two attackers at (6, 6): mean (2, 2); centred rows (-1, -2), (-3, -2),
# (-2, -1), (-2, -3), (4, 4), (4, 4); their scatter [[50, 48], [48, 50]] has its top eigenvector (1, 1) / sqrt 2
# (eigenvalue 98; (1, -1) / sqrt 2 has 2); scores (sum of a centred row)^2 / 2 = 4.5, 12.5, 4.5, 12.5, 32, 32
DNC_HONEST = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
DNC_X = t(DNC_HONEST + [[6.0, 6.0], [6.0, 6.0]])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dnc_hand_worked_removes_the_outliers_along_the_top_direction(sign):
    x = sign * DNC_X  # mirrored: the outliers' projection changes sign, their squared score does not
    assert_close(outlier_scores(x), t([4.5, 12.5, 4.5, 12.5, 32.0, 32.0]), rtol=1e-12, atol=1e-12)
    # n = 6, f = floor(0.4 x 6) = 2, c = 1: the two highest scores go, the mean of the four honest rows stays
    got = make("dnc", byzantine_fraction=0.4).aggregate(uploads(x))
    assert_close(got.step, t([0.0, 0.0]), rtol=0, atol=1e-12)
    assert_close(got.weights, t([0.25, 0.25, 0.25, 0.25, 0.0, 0.0]), rtol=0, atol=0)
    assert_close(x.mean(0), sign * t([2.0, 2.0]))  # what the plain mean would have moved by


def test_dnc_scores_do_not_depend_on_the_singular_vectors_sign():
    x = matrix((9, 6), 0)
    centred = (x - x.mean(0)).numpy()
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    for direction in (v, -v):
        assert_close(outlier_scores(x), torch.from_numpy((centred @ direction) ** 2), rtol=1e-10, atol=1e-12)
    assert_close(outlier_scores(-x), outlier_scores(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n, fraction, c, expected", [
    (10, 0.3, 1.0, 3),   # f = 3
    (10, 0.3, 0.5, 2),   # ceil(1.5)
    (5, 0.3, 1.0, 1),    # f = floor(1.5) = 1
    (3, 0.3, 1.0, 0),    # f = floor(0.9) = 0: nobody
    (7, 0.45, 2.0, 6),   # f = 3, 2f = 6 = n - 1: one user left
    (12, 0.25, 1.0, 3),  # 0.25 x 12 = 3 exactly
    (52, 0.49, 0.28, 7),  # f = floor(25.48) = 25; 0.28 x 25 is 7.000000000000001 in floats: still 7
])
def test_dnc_removes_ceil_c_times_f(n, fraction, c, expected):
    assert removed_count(n, fraction, c) == expected


def numpy_dnc(x, iterations, b, removed, seed, round_):
    """DnC (Algorithm 2) in numpy, with the same coordinate draws: one randperm(P) per iteration, its first b."""
    generator = seeded_generator(seed, round_, DNC_STREAM)
    n, size = x.shape
    kept = set(range(n))
    for _ in range(iterations):
        idx = torch.randperm(size, generator=generator)[:b].numpy() if b < size else np.arange(size)
        sub = x.numpy()[:, idx]
        centred = sub - sub.mean(0)
        v = np.linalg.svd(centred, full_matrices=False)[2][0]
        scores = (centred @ v) ** 2
        kept &= set(np.argsort(scores, kind="stable")[:n - removed].tolist())
    return sorted(kept)


@pytest.mark.parametrize("shape, b", [((7, 5), 3), ((12, 3), 2), ((30, 1000), 100), ((10, 20), 50)])
@pytest.mark.parametrize("iterations, c", [(1, 1.0), (3, 1.0), (2, 0.5)])
@pytest.mark.parametrize("seed, round_", [(0, 1), (0, 2), (5, 1)])
def test_dnc_equals_an_independent_numpy_computation(shape, b, iterations, c, seed, round_):
    x = matrix(shape, seed + 10 * round_) + 0.5
    x[: shape[0] // 5] *= 4  # a few outliers
    removed = math.ceil(c * math.floor(0.3 * shape[0] + 1e-9) - 1e-9)
    kept = numpy_dnc(x, iterations, b, removed, seed, round_)
    got = make("dnc", seed=seed, iterations=iterations, subsample_dim=b, filter_fraction=c).aggregate(
        uploads(x, round_))
    assert got.weights.nonzero().squeeze(1).tolist() == kept
    if kept:
        assert_close(got.step, x[kept].mean(0), rtol=1e-12, atol=1e-12)
        assert_close(got.weights.sum(), torch.tensor(1.0, dtype=F64))


def test_dnc_draws_are_reproducible_per_seed_and_round_and_need_no_history():
    x = matrix((20, 400), 1)
    x[:4] += 0.3
    weights = {(s, r): make("dnc", seed=s, subsample_dim=10, iterations=3).aggregate(uploads(x, r)).weights
               for s in (0, 1) for r in (1, 2, 3)}
    used = make("dnc", seed=0, subsample_dim=10, iterations=3)
    for r in (1, 2):
        used.aggregate(uploads(matrix((20, 400), r + 5), r))  # earlier rounds leave nothing behind: a resume
    assert torch.equal(used.aggregate(uploads(x, 3)).weights, weights[(0, 3)])
    assert make("dnc").state_dict() == {}
    # the draws differ between rounds and seeds: not all six choices coincide
    assert len({tuple(w.tolist()) for w in weights.values()}) > 1


def test_dnc_iterations_that_keep_disjoint_sets_trust_nobody():
    # 1-D sub-samples of 2 columns, n = 3, f = 1, c = 2: each iteration keeps only the row nearest the mean;
    # column 0 (0, 1, 5), mean 2: row 1; column 1 (1, 5, 0), mean 2: row 0. Two draws of different columns
    x = t([[0.0, 1.0], [1.0, 5.0], [5.0, 0.0]])
    def first_columns(seed):  # the column each of the two iterations draws
        generator = seeded_generator(seed, 1, DNC_STREAM)
        return {int(torch.randperm(2, generator=generator)[0]) for _ in range(2)}

    seed = next(s for s in range(100) if first_columns(s) == {0, 1})
    generator = seeded_generator(seed, 1, DNC_STREAM)
    assert not dnc_kept(x, 2, 1, 2, generator).any()
    got = make("dnc", seed=seed, iterations=2, subsample_dim=1, filter_fraction=2.0,
               byzantine_fraction=0.45).aggregate(uploads(x))
    assert torch.equal(got.step, torch.zeros(2, dtype=F64)) and torch.equal(got.weights, torch.zeros(3, dtype=F64))


# --- SignGuard -------------------------------------------------------------------------------------------------

def signs(positives, size=10, scale=1.0):
    """A row of ``size`` values +-scale, the first ``positives`` positive."""
    return [scale if j < positives else -scale for j in range(size)]


# five honest rows with 8, 8, 9, 9, 10 positives of 10, two sign-flipped ones (flips of 9 and 8: 1 and 2
# positives) and one honest-looking row x 100. Features (pos / 1.0, zero 0, neg / 0.9): the points lie on
# a line, |dp| x 1.4948 apart. n = 8: estimate_bandwidth reads each point's 3rd nearest other: 0.1 in p for
# the six near 0.9, 0.7 and 0.6 for p = 0.1 and 0.2; bandwidth = 1.9 / 8 = 0.2375 in p: the flipped pair
# (0.6 from the others) is its own cluster, the six are the largest. Norms sqrt 10 (x 100 for the last):
# median sqrt 10, ratio 100 > R = 3: the norm filter drops the huge row. Kept: the five honest rows, norm
# equal to the median (no clipping): the step is their mean
SG_HONEST = [signs(8), signs(8), signs(9), signs(9), signs(10)]
SG_X = t(SG_HONEST + [[-v for v in signs(9)], [-v for v in signs(8)], signs(9, scale=100.0)])


def test_signguard_hand_worked_the_sign_filter_drops_the_flipped_and_the_norm_filter_the_huge():
    features = sign_features(SG_X)
    assert_close(features[:, 0], t([0.8, 0.8, 0.9, 0.9, 1.0, 0.1, 0.2, 0.9]) / (1 + 1e-8))
    assert torch.equal(features[:, 1], torch.zeros(8, dtype=F64))
    assert_close(features[:, 2], t([0.2, 0.2, 0.1, 0.1, 0.0, 0.9, 0.8, 0.1]) / (0.9 + 1e-8))  # scaled by the largest
    assert np.array_equal(largest_sign_cluster(features.numpy(), 0), [True] * 5 + [False, False, True])
    norms = torch.linalg.vector_norm(SG_X, dim=1)
    assert norm_filter(norms, norms.median(), 0.1, 3.0).tolist() == [True] * 7 + [False]
    got = make("signguard", coordinate_fraction=1.0).aggregate(uploads(SG_X))
    assert_close(got.step, t(SG_HONEST).mean(0), rtol=1e-12, atol=1e-12)
    assert_close(got.weights, t([0.2] * 5 + [0.0] * 3), rtol=0, atol=0)


def test_signguard_hand_worked_bounds_and_clipping_to_the_median_norm():
    # one direction, norms sqrt 2 x (0.1, 1, 2, 3, 4): median 2 sqrt 2, ratios 0.05 < L = 0.1 (dropped), 0.5,
    # 1, 1.5, 2. Same signs: every feature (1, 0, 0), bandwidth 0: the coinciding rows are the cluster.
    # Clipped to norm 2 sqrt 2: (1, 1), (2, 2), (2, 2), (2, 2); mean (1.75, 1.75) (unclipped: 2.5)
    x = t([[0.1, 0.1], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    got = make("signguard", coordinate_fraction=1.0).aggregate(uploads(x))
    assert_close(got.step, t([1.75, 1.75]), rtol=1e-12, atol=1e-12)
    assert_close(got.weights, t([0.0, 0.25, 0.25, 0.25, 0.25]), rtol=0, atol=0)
    # R = 1.2: the ratios 1.5 and 2 go too; the kept (1, 1), (2, 2) are at most the median: mean (1.5, 1.5)
    got = make("signguard", coordinate_fraction=1.0, upper_bound=1.2).aggregate(uploads(x))
    assert_close(got.step, t([1.5, 1.5]), rtol=1e-12, atol=1e-12)
    # the bounds are inclusive: on one axis the norms 0.1, 1, 2, 3, 4 and median 2 are exact; L = 0.5 and
    # R = 1.5 keep the norms 1, 2, 3 (ratios 0.5, 1, 1.5), clipped to 1, 2, 2: mean 5 / 3
    x = t([[0.1, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    got = make("signguard", coordinate_fraction=1.0, lower_bound=0.5, upper_bound=1.5).aggregate(uploads(x))
    assert_close(got.step, t([5 / 3, 0.0]), rtol=1e-12, atol=1e-12)
    assert got.weights.nonzero().squeeze(1).tolist() == [1, 2, 3]


def test_signguard_keeps_nobody_when_the_largest_sign_cluster_fails_the_norm_filter():
    # three all-positive rows of norms 0.01, 0.01, 10 (ratios to the median 1: out), two all-negative of norm 1
    x = t([[0.01, 0.0], [0.01, 0.0], [10.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    x[:, 1] = x[:, 0]  # no zeros: the features are (1, 0, 0) or (0, 0, 1)
    x = x / math.sqrt(2)
    got = make("signguard", coordinate_fraction=1.0).aggregate(uploads(x))
    assert torch.equal(got.step, torch.zeros(2, dtype=F64)) and torch.equal(got.weights, torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("seed", range(6))
def test_signguard_clustering_equals_meanshift_called_directly(seed):
    from sklearn.cluster import MeanShift, estimate_bandwidth

    rng = np.random.default_rng(seed)
    n = [8, 12, 30, 60, 9, 20][seed]  # 60 > n_samples = 50: the bandwidth reads a random sub-sample
    features = np.concatenate([rng.normal(0.8, 0.05, (n - n // 3, 3)), rng.normal(0.3, 0.1, (n // 3, 3))])
    bandwidth = estimate_bandwidth(features, quantile=0.5, n_samples=50, random_state=seed)
    labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_
    largest = np.argmax([np.sum(labels == i) for i in range(labels.max() + 1)])
    assert np.array_equal(largest_sign_cluster(features, seed), labels == largest)


def numpy_signguard(x, lower, upper, fraction, seed, round_):
    """SignGuard in numpy and scikit-learn, with the same draws: randperm(P)[:k], then the bandwidth's
    random_state. Returns (step, kept indices)."""
    from sklearn.cluster import MeanShift, estimate_bandwidth

    generator = seeded_generator(seed, round_, SIGNGUARD_STREAM)
    a = x.numpy()
    n, size = a.shape
    norms = np.linalg.norm(a, axis=1)
    median = np.median(norms)
    by_norm = (norms >= lower * median) & (norms <= upper * median)
    k = max(1, math.floor(fraction * size + 1e-9))
    idx = torch.randperm(size, generator=generator)[:k].numpy() if k < size else np.arange(size)
    random_state = int(torch.randint(2**31 - 1, (1,), generator=generator))
    sub = a[:, idx]
    shares = np.stack([(sub > 0).mean(1), (sub == 0).mean(1), (sub < 0).mean(1)], axis=1)
    features = shares / (shares.max(0) + 1e-8)
    bandwidth = estimate_bandwidth(features, quantile=0.5, n_samples=50, random_state=random_state)
    labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_
    by_sign = labels == np.argmax([np.sum(labels == i) for i in range(labels.max() + 1)])
    kept = np.nonzero(by_norm & by_sign)[0]
    clipped = a[kept] * np.minimum(1, median / norms[kept])[:, None]
    return clipped.mean(0), kept.tolist()


@pytest.mark.parametrize("n, size, fraction", [(10, 200, 0.1), (30, 1000, 0.05), (8, 50, 1.0), (12, 64, 0.3)])
@pytest.mark.parametrize("seed, round_", [(0, 1), (0, 2), (3, 1)])
def test_signguard_equals_an_independent_numpy_and_sklearn_computation(n, size, fraction, seed, round_):
    x = matrix((n, size), seed + 10 * round_) + 0.8  # honest: mostly positive
    x[: n // 4] = -x[: n // 4] * 0.8  # sign-flipped attackers
    x[-1] *= 5  # one huge update
    x[-2, :5] = 0  # some exact zeros
    step, kept = numpy_signguard(x, 0.1, 3.0, fraction, seed, round_)
    got = make("signguard", seed=seed, coordinate_fraction=fraction).aggregate(uploads(x, round_))
    assert got.weights.nonzero().squeeze(1).tolist() == kept and kept
    assert_close(got.step, torch.from_numpy(step), rtol=1e-10, atol=1e-12)
    assert n - 1 not in kept and not set(range(n // 4)) & set(kept)  # the huge one and the flipped: out


def test_signguard_is_reproducible_per_seed_and_round_and_needs_no_history():
    x = matrix((12, 300), 2)
    first = make("signguard", seed=4).aggregate(uploads(x, 3))
    used = make("signguard", seed=4)
    used.aggregate(uploads(matrix((12, 300), 9), 1))
    again = used.aggregate(uploads(x, 3))
    assert torch.equal(first.step, again.step) and torch.equal(first.weights, again.weights)
    assert make("signguard").state_dict() == {}


# --- RLR -------------------------------------------------------------------------------------------------------

# three users, four coordinates; sign sums 3, -1, 1, 2 (a zero in column 3); means 2, -1, 1, 1/3
RLR_X = t([[1.0, -1.0, 2.0, 0.5],
           [2.0, 1.0, -1.0, 0.5],
           [3.0, -3.0, 2.0, 0.0]])


@pytest.mark.parametrize("threshold, theta, step", [
    (0.4, 2, [2.0, 1.0, -1.0, 1 / 3]),       # theta = ceil(1.2) = 2: |1| < 2 flipped, |2| and |3| kept
    (1.0, 3, [2.0, 1.0, -1.0, -1 / 3]),      # only the unanimous column 0 keeps its sign
    (0.5, 2, [2.0, 1.0, -1.0, 1 / 3]),       # ceil(1.5) = 2
    (0.0, 0, [2.0, -1.0, 1.0, 1 / 3]),       # nothing flipped: the plain mean
])
def test_rlr_hand_worked(threshold, theta, step):
    assert agreement_threshold(threshold, 3) == theta
    assert_close(robust_learning_rate(RLR_X, threshold), t(step), rtol=1e-12, atol=1e-12)
    got = make("rlr", threshold=threshold).aggregate(uploads(RLR_X))
    assert_close(got.step, t(step), rtol=1e-12, atol=1e-12)
    assert got.weights is None and REGISTRY["rlr"].flags == "none"


@pytest.mark.parametrize("threshold, n, theta", [(0.28, 25, 7), (0.14, 50, 7), (0.4, 10, 4), (0.25, 10, 3),
                                                 (1.0, 7, 7), (0.0, 5, 0), (0.2, 40, 8)])
def test_rlr_threshold_is_a_share_of_the_rounds_users(threshold, n, theta):
    assert agreement_threshold(threshold, n) == theta  # 0.28 x 25 is 7.000000000000001 in floats: still 7


@pytest.mark.parametrize("threshold", [0.2, 0.3, 0.5, 0.9])
def test_rlr_flips_exactly_the_coordinates_under_the_threshold(threshold):
    x = torch.round(matrix((10, 2000), 3) * 2) / 2  # a fifth of the values exactly 0
    x[:3, :500] = 1.0  # three users agreeing on a block
    sums = np.abs(np.sign(x.numpy()).sum(0))
    theta = agreement_threshold(threshold, 10)
    under = sums < theta
    mean = x.mean(0)
    step = make("rlr", threshold=threshold).aggregate(uploads(x)).step
    moved = mean != 0  # a zero mean is the same either way
    assert torch.equal((step == -mean)[moved], torch.from_numpy(under)[moved])
    assert torch.equal((step == mean)[moved], torch.from_numpy(~under)[moved])
    assert 0 < under.sum() < 2000


# --- shared: absent rows, fallbacks, partial uploads, validation ------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_dnc_signguard_rlr_leave_out_the_rows_the_guard_left_out(name):
    x = matrix((8, 30), 4)
    with_gap = torch.cat([x[:3], torch.full((1, 30), math.nan, dtype=F64), x[3:]])
    got, plain = make(name, seed=2).aggregate(uploads(with_gap)), make(name, seed=2).aggregate(uploads(x))
    assert_close(got.step, plain.step, rtol=0, atol=0)
    if REGISTRY[name].flags == "round":
        assert got.weights[3] == 0 and torch.equal(torch.cat([got.weights[:3], got.weights[4:]]), plain.weights)


@pytest.mark.parametrize("name, rows", [("dnc", 1), ("signguard", 3)])
def test_dnc_and_signguard_fall_back_to_the_plain_mean_of_too_few_rows(name, rows):
    x = matrix((rows, 5), 5)
    gap = torch.cat([x, torch.full((2, 5), math.nan, dtype=F64)])
    got = make(name).aggregate(uploads(gap))
    assert_close(got.step, x.mean(0), rtol=1e-12, atol=1e-12)
    assert_close(got.weights, torch.cat([torch.full((rows,), 1 / rows, dtype=F64), torch.zeros(2, dtype=F64)]))
    none = make(name).aggregate(uploads(torch.full((3, 5), math.nan, dtype=F64)))
    assert torch.equal(none.step, torch.zeros(5, dtype=F64))


def test_rlr_with_no_whole_upload_moves_nothing():
    got = make("rlr").aggregate(uploads(torch.full((3, 4), math.nan, dtype=F64)))
    assert torch.equal(got.step, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("name", NAMES)
def test_dnc_signguard_rlr_refuse_partial_uploads(name):
    assert not REGISTRY[name].handles_missing and REGISTRY[name].composable
    with pytest.raises(ConfigError, match=f"^protocol.theta_u: must be 1 for defense {name} "):
        check_arms(load_config(None, [*TINY, "protocol.theta_u=0.5"]), [name])


@pytest.mark.parametrize("name, field, value, message", [
    ("dnc", "iterations", 0, "must be an integer >= 1"),
    ("dnc", "iterations", 1.5, "must be an integer >= 1"),
    ("dnc", "subsample_dim", 0, "must be an integer >= 1"),
    ("dnc", "filter_fraction", 0.0, "must be a finite number in (0, 2]"),
    ("dnc", "filter_fraction", 2.5, "must be a finite number in (0, 2]"),
    ("dnc", "byzantine_fraction", 0.5, "must be in [0, 0.5)"),
    ("dnc", "byzantine_fraction", -0.1, "must be in [0, 0.5)"),
    ("signguard", "lower_bound", 1.5, "must be in [0, 1]"),
    ("signguard", "lower_bound", -0.1, "must be in [0, 1]"),
    ("signguard", "upper_bound", 0.5, "must be a finite number >= 1"),
    ("signguard", "upper_bound", math.inf, "must be a finite number >= 1"),
    ("signguard", "coordinate_fraction", 0.0, "must be in (0, 1]"),
    ("signguard", "coordinate_fraction", 1.5, "must be in (0, 1]"),
    ("rlr", "threshold", 1.5, "must be in [0, 1]"),
    ("rlr", "threshold", -0.2, "must be in [0, 1]"),
    ("rlr", "threshold", math.nan, "must be in [0, 1]"),
])
def test_dnc_signguard_rlr_refuse_bad_parameters_in_one_line(name, field, value, message):
    with pytest.raises(ConfigError) as err:
        REGISTRY[name].Params(**{field: value}).validate(f"defense.{name}")
    text = str(err.value)
    assert text.startswith(f"defense.{name}.{field}: {message}") and "\n" not in text
    with pytest.raises(ConfigError, match=f"^defense.{name}.{field}: "):  # through the config too
        load_config(None, [*TINY, f"defense.{name}.{field}={value}"])


# --- real runs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arm", [*NAMES, "nnm+dnc", "nnm+signguard", "bucketing+rlr"])
def test_dnc_signguard_rlr_run_on_the_tiny_config(arm):
    result = run_arm(load_config(None, TINY), arm)
    assert math.isfinite(result.metrics["accuracy"])
    dr, fpr = result.metrics["detection_rate"], result.metrics["false_positive_rate"]
    if arm in ("dnc", "signguard"):
        assert 0 <= dr <= 1 and 0 <= fpr <= 1 and len(result.detection["excluded_per_round"]) == 4
    else:
        assert dr is None and fpr is None


def digits(attack, *overrides):
    return load_config(DIGITS, [f"attack.name={attack}", "training.rounds=10", "training.device=cpu", *overrides])


def test_dnc_and_signguard_stop_label_flipping_on_digits():
    # measured: attack arm SR 0.957; dnc DR 1.0, FPR 0.0, SR 0.0; signguard DR 1.0, FPR 0.286, SR 0.0
    cfg = digits("label_flip")
    attacked = run_arm(cfg, "attack").metrics
    for arm, max_fpr in (("dnc", 0.1), ("signguard", 0.4)):
        m = run_arm(cfg, arm).metrics
        assert m["detection_rate"] >= 0.9 and m["false_positive_rate"] <= max_fpr, (arm, m)
        assert m["attack_success_rate"] <= attacked["attack_success_rate"] - 0.5, (arm, m, attacked)
        assert m["accuracy"] >= 0.7, (arm, m)


def test_rlr_against_the_backdoor_on_digits():
    # measured: attack arm SR 1.0; rlr SR 0.916 at the paper's 4 of 10 (threshold 0.4, one above the 3
    # attackers), 0.0 at 5 of 10; threshold 0 flips nothing: the attack arm's run
    attacked = run_arm(digits("backdoor"), "attack").metrics
    default = run_arm(digits("backdoor"), "rlr").metrics
    assert default["attack_success_rate"] < attacked["attack_success_rate"]
    half = run_arm(digits("backdoor", "defense.rlr.threshold=0.5"), "rlr").metrics
    assert half["attack_success_rate"] <= 0.1 and half["accuracy"] >= 0.7, half
    off = run_arm(digits("backdoor", "defense.rlr.threshold=0.0"), "rlr").metrics
    assert off["accuracy"] == pytest.approx(attacked["accuracy"], abs=0.01)
    assert off["attack_success_rate"] == pytest.approx(attacked["attack_success_rate"], abs=0.01)
