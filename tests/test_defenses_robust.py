"""Krum, Multi-Krum, median, trimmed mean, Bulyan and norm clipping: against
byzfl's reference aggregators, hand-worked cases, plain-loop references with
missing values, and parameter validation."""

import importlib
import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from pipeline.core.errors import ConfigError
from pipeline.core.server import ServerInputs, Uploads
from pipeline.defenses import REGISTRY
from pipeline.defenses.bulyan import BulyanParams, bulyan
from pipeline.defenses.krum import KrumParams, krum_scores, multi_krum_select
from pipeline.defenses.multi_krum import MultiKrumParams
from pipeline.defenses.median import coordinate_median
from pipeline.defenses.norm_clipping import NormClippingParams
from pipeline.defenses.trimmed_mean import TrimmedMeanParams, coordinate_trimmed_mean

NAN = math.nan
SHAPES = [(7, 5), (12, 3), (30, 1000)]
SEEDS = [0, 1]


def matrix(shape, seed, duplicates=False, integers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).float() if integers else torch.randn(shape, generator=g)
    if duplicates:  # ties: rows 1 and 2 copies of row 0, the last row a copy of row 3
        x[1] = x[2] = x[0]
        x[-1] = x[3]
    return x


def run(name, updates, **params):
    cls = REGISTRY[name]
    defense = cls(cls.Params(**params), ServerInputs(layout=()))
    updates = torch.as_tensor(updates, dtype=torch.float32)
    return defense.aggregate(Uploads(1, torch.arange(len(updates)), updates))


def test_the_docs_example_defense_runs(monkeypatch):
    """docs/extending.md's `norm_filter`: registered, it leaves out the `drop` largest updates and averages the rest."""
    import re
    from pathlib import Path

    import pipeline.defenses as defenses

    text = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    section = text[text.index("## Adding a defense"):text.index("## Adding an attack")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(defenses, "REGISTRY", dict(defenses.REGISTRY))  # the example registers into a copy
    exec(compile(code, "docs/extending.md", "exec"), {})
    cls = defenses.REGISTRY["norm_filter"]
    updates = torch.tensor([[1.0, 0.0], [0.0, 2.0], [30.0, 0.0], [0.0, -40.0], [NAN, 1.0]])
    out = cls(cls.Params(drop=2), ServerInputs(layout=())).aggregate(Uploads(1, torch.arange(5), updates))
    assert out.weights.tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]  # the two largest and the partial row left out
    assert_close(out.step, torch.tensor([0.5, 1.0]))
    with pytest.raises(ConfigError, match="^defense.norm_filter.drop: must be >= 0"):
        cls.Params(drop=-1).validate("defense.norm_filter")


# --- byzfl references (Krum / MultiKrum on float64 numpy: exact distances; Median / TrMean on torch) -----------
# (the fixture ``byzfl``: tests/conftest.py)

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("duplicates", [False, True])
def test_krum_and_multi_krum_match_byzfl(byzfl, shape, seed, duplicates):
    x = matrix(shape, seed, duplicates).double()
    n = shape[0]
    for g in sorted({1, n // 4 + 1, (n - 1) // 2}):  # byzfl's Krum(g) uses n - g - 1 neighbours: ours with f = g - 1
        expected = torch.from_numpy(byzfl.Krum(g)(x.numpy()))
        assert_close(x[multi_krum_select(x, g - 1, 1)][0], expected, rtol=0, atol=0)
        expected = torch.from_numpy(byzfl.MultiKrum(g)(x.numpy()))
        assert_close(x[multi_krum_select(x, g - 1, n - g)].mean(0), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_krum_defenses_match_byzfl_through_aggregate(byzfl, shape):
    x = matrix(shape, 3)
    n = shape[0]
    f = math.floor(0.3 * n)
    got = run("krum", x, byzantine_fraction=0.3)
    assert_close(got.step, torch.from_numpy(byzfl.Krum(f + 1)(x.double().numpy())).float(), rtol=0, atol=0)
    assert got.weights.sum() == 1 and (got.weights > 0).sum() == 1
    # multi_krum with m = n - f - 1 selected is byzfl's MultiKrum(f + 1)
    got = run("multi_krum", x, byzantine_fraction=0.3, selected_fraction=(n - f - 1) / n)
    assert_close(got.step, torch.from_numpy(byzfl.MultiKrum(f + 1)(x.double().numpy())).float())
    assert (got.weights > 0).sum() == n - f - 1
    assert (run("multi_krum", x, byzantine_fraction=0.3).weights > 0).sum() == n - f  # default m = n - f


@pytest.mark.parametrize("shape", SHAPES + [(8, 4), (2, 6), (1, 3)])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["plain", "duplicates", "integers"])
def test_median_matches_byzfl(byzfl, shape, seed, kind):
    x = matrix(shape, seed, duplicates=kind == "duplicates" and shape[0] >= 4, integers=kind == "integers")
    assert_close(coordinate_median(x), byzfl.Median()(x), rtol=0, atol=0)  # same lerp as torch.quantile
    assert_close(run("median", x).step, byzfl.Median()(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES + [(8, 4)])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["plain", "duplicates", "integers"])
def test_trimmed_mean_matches_byzfl(byzfl, shape, seed, kind):
    x = matrix(shape, seed, duplicates=kind == "duplicates", integers=kind == "integers")
    n = shape[0]
    for f in range(0, (n - 1) // 2 + 1):
        assert_close(coordinate_trimmed_mean(x, f / n), byzfl.TrMean(f)(x))
    assert_close(run("trimmed_mean", x, beta=0.29).step, byzfl.TrMean(math.floor(0.29 * n + 1e-9))(x))


def test_trimmed_mean_count_is_exact_at_float_edges(byzfl):
    x = matrix((100, 3), 8)  # 0.29 * 100 = 28.999999999999996 in floating point: still 29 trimmed per side
    assert_close(run("trimmed_mean", x, beta=0.29).step, byzfl.TrMean(29)(x))


# --- Bulyan ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "duplicates", "integers"])
@pytest.mark.parametrize("shape, k", [((18, 5000), 6), ((7, 300), 1), ((33, 200), 33), ((4, 50), 2)])
def test_smallest_rows_is_the_stable_argsort(kind, shape, k):
    """Bulyan's partial selection gives the rows a stable sort gives: the same aggregate to the last bit."""
    from pipeline.defenses.median import smallest_rows

    x = matrix(shape, 3, duplicates=kind == "duplicates", integers=kind == "integers").abs()
    x[0, :7] = torch.tensor([0.0, -0.0, math.inf, 1e-45, 3.4e38, 0.0, 0.0])[: min(7, shape[1])]
    expected = x.argsort(dim=0, stable=True)[:k]
    assert torch.equal(smallest_rows(x, k), expected)
    assert torch.equal(smallest_rows(x.double(), k), expected)  # other dtypes: the sort itself


def test_bulyan_hand_worked():
    # n = 7, f = 1: theta = 5 rows by iterated Krum, then beta = 3 values around the median.
    # Krum with r rows remaining sums the r - f - 2 (>= 1) smallest squared distances:
    #   r=7, k=4: 0->1+9+16+81=107, 1->1+4+9+64=78, 3->9+4+1+36=50, 4->16+9+1+25=51, 9->206, 50, -40 larger: pick 3
    #   r=6, k=3: 0->1+16+81=98, 1->1+9+64=74, 4->16+9+25=50, 9->170: pick 4
    #   r=5, k=2: 0->1+81=82, 1->1+64=65, 9->81+64=145: pick 1
    #   r=4, k=1: 0->81, 9->81 (tie, lower row wins), 50->1681, -40->1600: pick 0
    #   r=3, k=1: 9->1681, 50->1681 (tie), -40->2401: pick 9
    # selected {3, 4, 1, 0, 9}: median 3, the 3 closest are 3, 4, 1: mean 8/3
    x = torch.tensor([0.0, 1, 3, 4, 9, 50, -40])[:, None]
    step, selected = bulyan(x, 1)
    assert selected.tolist() == [2, 3, 1, 0, 4]
    assert_close(step, torch.tensor([8 / 3]))
    got = run("bulyan", x, byzantine_fraction=0.2)  # floor(0.2 * 7) = 1
    assert_close(got.step, torch.tensor([8 / 3]))
    assert_close(got.weights, torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0, 0]))


def test_bulyan_never_selects_a_far_outlier():
    x = matrix((11, 50), 5)
    x[6] += 1000.0  # n = 11 allows f = 2 (11 >= 4 * 2 + 3)
    got = run("bulyan", x, byzantine_fraction=0.2)
    assert got.weights[6] == 0
    assert (got.weights > 0).sum() == 11 - 2 * 2
    honest = torch.cat([x[:6], x[7:]])
    assert (got.step - honest.mean(0)).abs().max() < 1.0  # the plain mean is off by about 90
    assert (x.mean(0) - honest.mean(0)).abs().max() > 50


def test_bulyan_with_no_attacker_is_the_mean():
    x = matrix((6, 9), 2)  # f = floor(0.2 * 6) = 1 lowered to (6 - 3) // 4 = 0: theta = beta = n
    assert_close(run("bulyan", x, byzantine_fraction=0.2).step, x.mean(0))


# --- missing values ----------------------------------------------------------------------------------------------

MASKED = torch.tensor([
    [1.0, NAN, 4.0, NAN, 2.0],
    [5.0, NAN, NAN, NAN, 2.0],
    [NAN, NAN, NAN, NAN, NAN],
    [-2.0, 7.0, 0.5, NAN, 2.0],
    [3.0, NAN, 9.0, NAN, -1.0],
    [8.0, NAN, -6.0, NAN, 30.0],
    [0.0, NAN, 1.0, NAN, 2.0],
], dtype=torch.float64)


def present_values(column):
    return sorted(v for v in column.tolist() if not math.isnan(v))


def test_median_with_missing_values_matches_a_loop():
    expected = [statistics.median(v) if (v := present_values(MASKED[:, j])) else 0.0 for j in range(MASKED.shape[1])]
    assert_close(coordinate_median(MASKED), torch.tensor(expected, dtype=torch.float64))
    assert_close(run("median", MASKED).step, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.34, 0.49])
def test_trimmed_mean_with_missing_values_matches_a_loop(beta):
    expected = []
    for j in range(MASKED.shape[1]):
        v = present_values(MASKED[:, j])
        k = min(math.floor(beta * len(v)), (len(v) - 1) // 2)
        expected.append(statistics.mean(v[k:len(v) - k]) if v else 0.0)
    assert_close(coordinate_trimmed_mean(MASKED, beta), torch.tensor(expected, dtype=torch.float64))
    assert_close(run("trimmed_mean", MASKED, beta=beta).step, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan"])
def test_whole_vector_rules_leave_absent_and_partial_rows_out(name):
    x = matrix((9, 20), 4)
    x[2] = NAN  # absent
    x[5, :3] = NAN  # partial upload
    got = run(name, x)
    complete = [0, 1, 3, 4, 6, 7, 8]
    assert got.weights[2] == 0 and got.weights[5] == 0
    assert_close(got.step, run(name, x[complete]).step)
    assert_close(got.weights[complete], run(name, x[complete]).weights)
    assert not torch.isnan(got.step).any()


def test_krum_falls_back_to_the_mean_of_fewer_than_three_rows():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [NAN, NAN]])
    got = run("krum", x)
    assert_close(got.step, torch.tensor([2.0, 4.0]))
    assert_close(got.weights, torch.tensor([0.5, 0.5, 0.0]))


def test_krum_lowers_f_for_small_rounds():
    x = torch.tensor([[0.0], [1.0], [10.0]])  # floor(0.49 * 3) = 1 > n - 3 = 0: f = 0, one neighbour each
    assert krum_scores(x.double(), 0).tolist() == pytest.approx([1.0, 1.0, 81.0])
    assert_close(run("krum", x, byzantine_fraction=0.49).step, torch.tensor([0.0]))


# --- norm clipping -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_norm_clipping_bounds_a_huge_update(max_norm):
    x = matrix((8, 30), 6) * 0.1  # norms about 0.55
    x[3] = 1e6
    norms = x.double().norm(dim=1)
    bound = max_norm or norms.sort().values[3:5].mean().item()  # 0: the median of the 8 norms
    got = run("norm_clipping", x, max_norm=max_norm)
    expected = (x.double() * torch.clamp(bound / norms, max=1)[:, None]).mean(0)
    assert_close(got.step.double(), expected, rtol=1e-5, atol=1e-7)
    assert got.step.norm() <= bound * (1 + 1e-6)
    # the huge row adds a vector of norm `bound` / 8, not 1e6 * sqrt(30) / 8
    others = torch.cat([x[:3], x[4:]]).double()
    others = (others * torch.clamp(bound / others.norm(dim=1), max=1)[:, None]).sum(0)
    assert (got.step.double() * 8 - others).norm().item() == pytest.approx(bound, rel=1e-4)


def test_norm_clipping_under_the_bound_is_the_mean():
    x = matrix((8, 30), 7) * 0.01  # norms about 0.05
    assert_close(run("norm_clipping", x, max_norm=1.0).step, x.mean(0))


def test_norm_clipping_median_norm_and_missing_values():
    x = torch.tensor([[3.0, 4.0, NAN], [NAN, NAN, NAN], [0.0, 1.0, 0.0], [NAN, 20.0, 0.0], [6.0, 8.0, 0.0]])
    # norms of the present rows: 5, 1, 20, 10 -> median (5 + 10) / 2 = 7.5
    got = run("norm_clipping", x)
    # clipped: [3, 4, -], [0, 1, 0], [-, 7.5, 0] (x 7.5/20), [4.5, 6, 0] (x 7.5/10); per-coordinate means
    assert_close(got.step, torch.tensor([7.5 / 3, 18.5 / 4, 0.0]))
    assert got.weights is None


# --- registry and validation -------------------------------------------------------------------------------------

def test_registered_with_the_documented_flags():
    expected = {"krum": ("round", False), "multi_krum": ("round", False), "bulyan": ("round", False),
                "median": ("none", True), "trimmed_mean": ("none", True), "norm_clipping": ("none", True)}
    for name, (flags, missing) in expected.items():
        cls = REGISTRY[name]
        assert (cls.flags, cls.handles_missing) == (flags, missing), name
        assert cls.summary and "\n" not in cls.summary
        cls.Params().validate(f"defense.{name}")  # the defaults are valid


@pytest.mark.parametrize("params, key", [
    (KrumParams(byzantine_fraction=0.5), "defense.krum.byzantine_fraction"),
    (KrumParams(byzantine_fraction=-0.1), "defense.krum.byzantine_fraction"),
    (MultiKrumParams(selected_fraction=1.5), "defense.multi_krum.selected_fraction"),
    (MultiKrumParams(byzantine_fraction=0.7), "defense.multi_krum.byzantine_fraction"),
    (BulyanParams(byzantine_fraction=0.25), "defense.bulyan.byzantine_fraction"),
    (TrimmedMeanParams(beta=0.5), "defense.trimmed_mean.beta"),
    (TrimmedMeanParams(beta=-0.01), "defense.trimmed_mean.beta"),
    (NormClippingParams(max_norm=-1.0), "defense.norm_clipping.max_norm"),
    (NormClippingParams(max_norm=math.inf), "defense.norm_clipping.max_norm"),
])
def test_bad_parameters_name_their_key(params, key):
    section = key.rsplit(".", 1)[0]
    with pytest.raises(ConfigError, match=f"^{key}: "):
        params.validate(section)
