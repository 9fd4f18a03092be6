"""Geometric median, centered clipping and MeaMed: equal to byzfl's aggregators, hand-worked
cases, their state across rounds, and parameter validation."""

import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.core.errors import ConfigError
from pipeline.core.server import ServerInputs, Uploads
from pipeline.defenses import REGISTRY
from pipeline.defenses.centered_clipping import centered_clip
from pipeline.defenses.geometric_median import smoothed_weiszfeld

SHAPES = [(7, 5), (12, 3), (30, 1000)]


def matrix(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make(name, **params):
    cls = REGISTRY[name]
    return cls(cls.Params(**params), ServerInputs(layout=()))


def uploads(x, round_=1):
    return Uploads(round_, torch.arange(len(x)), x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iterations, nu", [(3, 0.1), (1, 0.1), (10, 1e-3), (5, 2.0)])
def test_geometric_median_equals_byzfl(byzfl, shape, iterations, nu):
    x = matrix(shape, 0) + 3  # away from 0, the start
    expected = torch.from_numpy(byzfl.GeometricMedian(nu=nu, T=iterations)(x.numpy()))
    assert_close(smoothed_weiszfeld(x, iterations, nu), expected, rtol=1e-12, atol=1e-12)
    assert_close(make("geometric_median", iterations=iterations, nu=nu).aggregate(uploads(x)).step, expected,
                 rtol=1e-12, atol=1e-12)


def test_geometric_median_resists_what_moves_the_mean():
    """Five points on a unit square's corners and centre, and two far outliers: the estimate stays inside
    the square, where the unit vectors towards all seven points sum to 0 (the geometric median's
    optimality condition), while the mean is dragged 28 units away."""
    honest = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    x = torch.cat([honest, torch.tensor([[100.0, 100.0], [100.0, 100.0]], dtype=torch.float64)])
    step = smoothed_weiszfeld(x, 200, 1e-9)
    assert x.mean(0)[0] > 28
    assert ((step > 0) & (step < 1)).all()
    towards = (x - step) / torch.linalg.vector_norm(x - step, dim=1, keepdim=True)
    assert torch.linalg.vector_norm(towards.sum(0)) < 1e-6
    # with all points at one place, that place (the smoothing keeps the weights finite)
    assert_close(smoothed_weiszfeld(torch.ones(4, 3, dtype=torch.float64), 3, 0.1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau, iterations", [(1.0, 1), (0.5, 3), (100.0, 1)])
def test_centered_clipping_equals_byzfl_round_after_round(byzfl, shape, tau, iterations):
    reference = byzfl.CenteredClipping(L=iterations, tau=tau)
    ours = make("centered_clipping", tau=tau, iterations=iterations)
    for round_ in range(1, 4):  # both keep the last step as the next round's start
        x = matrix(shape, round_) + round_
        expected = torch.from_numpy(reference(x.numpy()))
        assert_close(ours.aggregate(uploads(x, round_)).step, expected, rtol=1e-12, atol=1e-12)


def test_centered_clipping_hand_worked_and_its_median_radius():
    # from 0, tau 1: (3, 0) clipped to (1, 0); (0, 0.5) kept; the mean of the offsets is (0.5, 0.25)
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    assert_close(centered_clip(x, torch.zeros(2, dtype=torch.float64), 1.0, 1), torch.tensor([0.5, 0.25],
                                                                                            dtype=torch.float64))
    # tau 0: the median distance from the start, here 2 of (1, 2, 10): only the far update is clipped
    x = torch.tensor([[1.0], [2.0], [10.0]], dtype=torch.float64)
    assert_close(centered_clip(x, torch.zeros(1, dtype=torch.float64), 0.0, 1),
                 torch.tensor([(1 + 2 + 2) / 3], dtype=torch.float64))


def test_centered_clipping_state_survives_a_resume():
    first, resumed = make("centered_clipping", tau=0.5), make("centered_clipping", tau=0.5)
    first.aggregate(uploads(matrix((6, 4), 0)))
    resumed.load_state_dict(first.state_dict())
    x = matrix((6, 4), 1)
    assert_close(resumed.aggregate(uploads(x, 2)).step, first.aggregate(uploads(x, 2)).step, rtol=0, atol=0)
    assert make("centered_clipping").state_dict() == {}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.3, 0.45])
def test_meamed_equals_byzfl(byzfl, shape, fraction):
    x = matrix(shape, 2)
    n = shape[0]
    f = min(math.floor(fraction * n + 1e-9), (n - 1) // 2)
    expected = torch.from_numpy(byzfl.Meamed(f=f)(x.numpy()))
    assert_close(make("meamed", byzantine_fraction=fraction).aggregate(uploads(x)).step, expected,
                 rtol=1e-12, atol=1e-12)


def test_meamed_hand_worked():
    # one coordinate, values 0, 1, 2, 10, 11; median 2; f = 1 (0.3 x 5): the 4 nearest 2 are 0, 1, 2, 10
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]], dtype=torch.float64)
    assert make("meamed", byzantine_fraction=0.3).aggregate(uploads(x)).step.item() == pytest.approx(13 / 4)


@pytest.mark.parametrize("name", ["geometric_median", "centered_clipping", "meamed"])
def test_rows_left_out_by_the_guard_are_not_aggregated_and_nobody_is_flagged(name):
    x = matrix((6, 4), 3)
    with_gap = torch.cat([x, torch.full((1, 4), math.nan, dtype=torch.float64)])
    got = make(name).aggregate(uploads(with_gap))
    assert_close(got.step, make(name).aggregate(uploads(x)).step, rtol=0, atol=0)
    assert got.weights is None and REGISTRY[name].flags == "none"
    empty = make(name).aggregate(uploads(torch.full((3, 4), math.nan, dtype=torch.float64)))
    assert torch.equal(empty.step, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("name, field, value, message", [
    ("geometric_median", "iterations", 0, "must be an integer >= 1"),
    ("geometric_median", "nu", 0.0, "must be a finite number > 0"),
    ("centered_clipping", "tau", -1.0, "must be a finite number >= 0"),
    ("centered_clipping", "iterations", 1.5, "must be an integer >= 1"),
    ("meamed", "byzantine_fraction", 0.5, "must be in [0, 0.5)"),
])
def test_bad_parameters_are_refused_in_one_line(name, field, value, message):
    params = REGISTRY[name].Params(**{field: value})
    with pytest.raises(ConfigError) as err:
        params.validate(f"defense.{name}")
    assert str(err.value).startswith(f"defense.{name}.{field}: {message}")


# --- pre-aggregators and composed arms -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.45])
def test_nnm_equals_byzfl(byzfl, shape, fraction):
    from pipeline.defenses.preaggregators import nearest_neighbour_mixing

    x = matrix(shape, 4)
    f = math.floor(fraction * shape[0] + 1e-9)
    assert_close(nearest_neighbour_mixing(x, f), torch.from_numpy(byzfl.NNM(f=f)(x.numpy())), rtol=1e-12, atol=1e-12)
    got = make("nnm", byzantine_fraction=fraction).transform(x, 1)
    assert_close(got, torch.from_numpy(byzfl.NNM(f=f)(x.numpy())), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, size", [(7, 2), (12, 3), (30, 1), (5, 5), (4, 8)])
def test_bucketing_equals_byzfl_seeded_alike(byzfl, n, size):
    from pipeline.core.device import seeded_generator
    from pipeline.defenses.preaggregators import BUCKET_STREAM

    x = matrix((n, 6), 5).float()  # byzfl's torch path works in float32
    cls = REGISTRY["bucketing"]
    ours = cls(cls.Params(bucket_size=size), ServerInputs(layout=(), seed=3)).transform(x, 2)
    torch.manual_seed(seeded_generator(3, 2, BUCKET_STREAM).initial_seed())  # byzfl draws from torch's generator
    assert_close(ours, byzfl.Bucketing(s=size)(x), rtol=1e-6, atol=1e-7)
    assert ours.shape == (math.ceil(n / size), 6)
    if n % size == 0:  # equal buckets: their means average to the mean
        assert_close(ours.mean(0), x.mean(0), rtol=1e-5, atol=1e-6)


def test_a_composed_arm_pre_aggregates_then_aggregates_and_flags_nobody():
    from pipeline.defenses.compose import composed
    from pipeline.defenses.median import coordinate_median
    from pipeline.defenses.preaggregators import nearest_neighbour_mixing

    cls = composed("nnm+median")
    defense = cls({"nnm": REGISTRY["nnm"].Params(byzantine_fraction=0.3), "median": REGISTRY["median"].Params()},
                  ServerInputs(layout=()))
    x = matrix((10, 5), 6)
    with_gap = torch.cat([x, torch.full((1, 5), math.nan, dtype=torch.float64)])  # a row the guard left out
    got = defense.aggregate(uploads(with_gap))
    assert_close(got.step, coordinate_median(nearest_neighbour_mixing(x, 3)), rtol=0, atol=0)
    assert got.weights is None and cls.flags == "none" and cls.name == "nnm+median"


def test_composed_arms_run_are_keyed_by_every_part_and_refuse_what_cannot_compose():
    from pipeline.experiment.arms import arm_params, check_arms, run_arm
    from pipeline.experiment.config import load_config
    from pipeline.experiment.grid import cell_config
    from tests.conftest import TINY

    cfg = load_config(None, TINY)
    assert check_arms(cfg, ["bucketing+krum", "median", "benign"]) == ["benign", "median", "bucketing+krum"]
    result = run_arm(cfg, "bucketing+nnm+centered_clipping")
    assert result.metrics["detection_rate"] is None and result.metrics["false_positive_rate"] is None
    assert math.isfinite(result.metrics["accuracy"])
    params = arm_params(cfg, "nnm+median")
    assert "defense.nnm.byzantine_fraction" in params and "defense.krum.byzantine_fraction" not in params
    changed = load_config(None, [*TINY, "defense.nnm.byzantine_fraction=0.1"])
    assert cell_config(changed, "nnm+median") != cell_config(cfg, "nnm+median")
    assert cell_config(changed, "median") == cell_config(cfg, "median")
    for arm, message in [("nnm", "nnm is a pre-aggregator: write it in front of a rule, e.g. nnm+median"),
                         ("nnm+foolsgold", "nnm+foolsgold: 'foolsgold' is not a rule a pre-aggregator can feed"),
                         ("median+nnm", "median+nnm: 'median' is not a pre-aggregator (bucketing, nnm)")]:
        with pytest.raises(ConfigError) as err:
            check_arms(cfg, [arm])
        assert str(err.value).startswith(f"--arms: {message}")
    masked = load_config(None, [*TINY, "protocol.theta_u=0.5"])
    with pytest.raises(ConfigError, match="^protocol.theta_u: must be 1 for defense nnm\\+median"):
        check_arms(masked, ["nnm+median"])


def test_norm_clipping_adds_seeded_gaussian_noise_only_when_asked():
    x = matrix((8, 2000), 7).float()
    server = ServerInputs(layout=(), seed=5)
    plain = REGISTRY["norm_clipping"](REGISTRY["norm_clipping"].Params(), server)
    noisy = REGISTRY["norm_clipping"](REGISTRY["norm_clipping"].Params(noise_std=0.5), server)
    clean = plain.aggregate(uploads(x, 3)).step
    noise = noisy.aggregate(uploads(x, 3)).step - clean
    assert noise.std().item() == pytest.approx(0.5, rel=0.05) and abs(noise.mean().item()) < 0.05
    assert torch.equal(noisy.aggregate(uploads(x, 3)).step - clean, noise)  # the same run, the same noise
    assert not torch.equal(noisy.aggregate(uploads(x, 4)).step - plain.aggregate(uploads(x, 4)).step, noise)
    from pipeline.experiment.config import load_config
    from pipeline.experiment.grid import cell_config
    from tests.conftest import TINY

    # the default (no noise) is left out of a cell's key: the committed norm_clipping cells are still found
    assert "defense.norm_clipping.noise_std" not in cell_config(load_config(None, TINY), "norm_clipping")
    assert "defense.norm_clipping.noise_std" in cell_config(
        load_config(None, [*TINY, "defense.norm_clipping.noise_std=0.01"]), "norm_clipping")
