"""FoolsGold, FLTrust and FLAME on hand-worked uploads (the papers' definitions)."""

import io
import math

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.server import ServerInputs, Uploads
from pipeline.defenses import REGISTRY
from pipeline.defenses.flame import Flame, FlameParams, cosine_distances
from pipeline.defenses.fltrust import FLTrust, FLTrustParams
from pipeline.defenses.foolsgold import FoolsGold, FoolsGoldParams, cosine_similarities, foolsgold_weights

SERVER = ServerInputs(layout=(), seed=0)


def uploads(rows, round_=1):
    rows = torch.as_tensor(rows, dtype=torch.float32)
    return Uploads(round_, torch.arange(len(rows)), rows)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(v):
    return v / v.norm()


# --- shared: cosine similarities --------------------------------------------------

def test_cosine_similarities_match_pairwise_cosines_and_zero_rows_give_zero():
    x = randn(5, 30)
    x[4] = 0
    cs = cosine_similarities(x)
    assert cs.dtype == torch.float64
    for i in range(4):
        for j in range(4):
            expected = torch.nn.functional.cosine_similarity(x[i], x[j], dim=0).item()
            assert cs[i, j].item() == pytest.approx(expected, abs=1e-6)
    assert (cs[4] == 0).all()
    d = cosine_distances(x)
    assert torch.equal(d, d.T) and (d.diagonal() == 0).all() and (d >= 0).all()


# --- FoolsGold --------------------------------------------------------------------

def test_foolsgold_pardoning_and_logit_by_hand():
    # users 0 and 1 identical (sybils, v = 1); user 2 at cosine c = 0.7 to them; user 3 orthogonal to all
    c = 0.7
    h = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [c, math.sqrt(1 - c * c), 0], [0, 0, 1.0]])
    # pardoning: cs_20 = c * v_2 / v_0 = c^2, so wv_2 = 1 - c^2 = 0.51 (0.3 without it, logit -> 0);
    # wv_3 = 1 -> 0.99 cap -> logit > 1 -> 1; the sybils' wv = 0 -> log 0 -> 0
    wv2 = 1 - c * c
    expected = torch.tensor([0.0, 0.0, math.log(wv2 / (1 - wv2)) + 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(foolsgold_weights(h), expected, atol=1e-9)
    expected[2] = 0.5 * expected[2]  # κ scales the logit
    assert torch.allclose(foolsgold_weights(h, confidence=0.5), expected, atol=1e-9)


def test_foolsgold_gives_identical_sybils_zero_weight():
    honest, sybil = randn(6, 500, seed=1), randn(500, seed=2)
    rows = torch.cat([honest, sybil.expand(3, -1)])
    rows[4] = float("nan")  # absent this round
    d = FoolsGold(FoolsGoldParams(), SERVER)
    result = d.aggregate(uploads(rows))
    w = result.weights
    assert torch.all(w[6:] == 0) and w[4] == 0
    assert torch.all(w[[0, 1, 2, 3, 5]] > 0)
    assert w.sum().item() == pytest.approx(1.0)
    kept = [0, 1, 2, 3, 5]
    assert torch.allclose(result.step, (w[kept, None] * rows[kept]).sum(0) / w[kept].sum(), atol=1e-6)
    assert d.history.of(4) is None and d.history.of(0) is not None  # an absent user has no history yet


def test_foolsgold_remembers_history_across_rounds():
    honest, sybil = randn(5, 500, seed=3), randn(500, seed=4)
    d = FoolsGold(FoolsGoldParams(), SERVER)
    for round_ in (1, 2):
        d.aggregate(uploads(torch.cat([randn(5, 500, seed=10 + round_), 10 * sybil.expand(3, -1)]), round_))
    # round 3: the sybils now send different small updates; their histories still point the same way
    third = torch.cat([honest, 0.1 * randn(3, 500, seed=5)])
    assert torch.all(d.aggregate(uploads(third, 3)).weights[5:] == 0)
    assert torch.all(FoolsGold(FoolsGoldParams(), SERVER).aggregate(uploads(third, 3)).weights[5:] > 0)


def test_foolsgold_keeps_a_history_row_per_user_seen_and_weighs_as_a_row_per_id_would():
    """Sampled rounds out of 10,000 ids: the rows held follow the users seen; the weights equal those of a
    history with a row for every id (the paper's), the same floats."""
    d, dense = FoolsGold(FoolsGoldParams(), SERVER), torch.zeros(10_000, 50)
    seen = set()
    for round_ in range(1, 6):
        ids = torch.randperm(10_000, generator=torch.Generator().manual_seed(round_))[:8].sort().values
        ids[:2] = torch.tensor([3, 9_999])  # two users in every round: histories over rounds
        ids = ids.unique()
        rows = randn(len(ids), 50, seed=round_)
        rows[1] = rows[0]  # a sybil pair
        dense[ids] += rows
        seen |= set(ids.tolist())
        result = d.aggregate(Uploads(round_, ids, rows))
        expected = foolsgold_weights(dense[ids])
        assert torch.equal(result.weights, (expected / expected.sum()).float())
        assert set(d.history.index) == seen and len(d.history.rows) < 2 * len(seen)
        assert torch.equal(d.history.of(9_999), dense[9_999])


def test_foolsgold_resumes_a_checkpoint_of_a_history_row_per_id():
    """A checkpoint written when the history held a row per id (row u: user u) resumes as the same history."""
    dense = randn(4, 30, seed=8)
    d = FoolsGold(FoolsGoldParams(), SERVER)
    d.load_state_dict({"history": dense.clone()})
    assert all(torch.equal(d.history.of(u), dense[u]) for u in range(4)) and d.history.of(4) is None
    step = randn(2, 30, seed=9)
    d.aggregate(Uploads(1, torch.tensor([1, 5]), step))
    assert torch.equal(d.history.of(1), dense[1] + step[0]) and torch.equal(d.history.of(5), step[1])


def test_foolsgold_state_dict_round_trip_gives_the_same_next_round():
    d = FoolsGold(FoolsGoldParams(), SERVER)
    for round_ in (1, 2):
        d.aggregate(uploads(torch.cat([randn(5, 200, seed=20 + round_), randn(200, seed=6).expand(2, -1)]), round_))
    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    buffer.seek(0)
    resumed = FoolsGold(FoolsGoldParams(), SERVER)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu"))
    third = uploads(randn(7, 200, seed=7), 3)
    a, b = d.aggregate(third), resumed.aggregate(third)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.step, b.step)
    assert torch.all(a.weights[5:] == 0)  # the saved history mattered: a fresh defense would admit them
    assert not torch.equal(FoolsGold(FoolsGoldParams(), SERVER).aggregate(third).weights, a.weights)


# --- FLTrust ----------------------------------------------------------------------

def fltrust(g0):
    g0 = torch.as_tensor(g0, dtype=torch.float32)
    return FLTrust(FLTrustParams(), ServerInputs(layout=(), seed=0, root_update=lambda r: g0))


def test_fltrust_by_hand():
    # g0 = (2, 0); (1, 1): TS = 1/sqrt 2, rescaled to (sqrt 2, sqrt 2); (3, 0): TS = 1, rescaled to (2, 0);
    # (0, 3): orthogonal, TS = 0; (-1, 0): opposite, TS = 0
    result = fltrust([2.0, 0.0]).aggregate(uploads([[1.0, 1.0], [3.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))
    ts = 1 / math.sqrt(2)
    expected = (ts * torch.tensor([math.sqrt(2), math.sqrt(2)]) + torch.tensor([2.0, 0.0])) / (ts + 1)
    assert torch.allclose(result.step, expected, atol=1e-6)
    assert torch.allclose(result.weights, torch.tensor([ts / (ts + 1), 1 / (ts + 1), 0, 0]), atol=1e-6)


def test_fltrust_gives_an_update_against_the_server_weight_zero():
    g0 = randn(100, seed=8)
    rows = torch.stack([g0 + 0.5 * randn(100, seed=9), 2 * g0, -3 * g0])
    result = fltrust(g0).aggregate(uploads(rows))
    assert result.weights[2] == 0 and torch.all(result.weights[:2] > 0)
    assert torch.allclose(result.step, fltrust(g0).aggregate(uploads(rows[:2])).step, atol=1e-6)


def test_fltrust_step_has_the_servers_norm_when_updates_agree():
    g0, u = randn(100, seed=10), randn(100, seed=11)
    u = u + g0 * (1 - torch.dot(u, g0) / torch.dot(g0, g0))  # positive cosine with g0, another direction
    result = fltrust(g0).aggregate(uploads(torch.stack([0.1 * u, 3 * u, 50 * u])))
    assert torch.all(result.weights > 0)
    assert result.step.norm().item() == pytest.approx(g0.norm().item(), rel=1e-5)
    assert torch.allclose(result.step, unit(u) * g0.norm(), atol=1e-5)


def test_fltrust_rescaling_an_update_does_not_change_the_step():
    g0 = randn(100, seed=12)
    rows = g0 + randn(4, 100, seed=13)
    scaled = rows.clone()
    scaled[1] *= 100
    a, b = fltrust(g0).aggregate(uploads(rows)), fltrust(g0).aggregate(uploads(scaled))
    assert torch.allclose(a.step, b.step, atol=1e-5) and torch.allclose(a.weights, b.weights, atol=1e-6)
    assert not torch.allclose(a.step, rows.mean(0), atol=1e-3)


def test_fltrust_with_every_trust_zero_or_absent():
    rows = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [float("nan")] * 2])
    result = fltrust([1.0, 0.0]).aggregate(uploads(rows))
    assert torch.equal(result.step, torch.zeros(2)) and torch.equal(result.weights, torch.zeros(3))


# --- FLAME ------------------------------------------------------------------------

def planted(honest=6, outliers=4, p=300):
    """Honest users around one direction with norms 1, 2, ...; identical outliers of norm 10 against it."""
    h = randn(p, seed=14)
    rows = torch.stack([r * unit(h + 0.3 * randn(p, seed=15 + r)) for r in range(1, honest + 1)])
    return torch.cat([rows, (10 * unit(-h + randn(p, seed=30))).expand(outliers, -1)])


def test_flame_excludes_a_planted_cluster_of_identical_outliers():
    # 3 of 10: HDBSCAN's one cluster (min_cluster_size 6) keeps the honest users that stay in it to
    # the end; an honest straggler that leaves it earlier is labelled noise as well
    result = Flame(FlameParams(noise_lambda=0.0), SERVER).aggregate(uploads(planted(honest=7, outliers=3)))
    admitted = result.weights > 0
    assert not admitted[7:].any()
    assert admitted[:7].sum() >= 6
    assert torch.allclose(result.weights[admitted], torch.full((int(admitted.sum()),), 1 / float(admitted.sum())))


def test_flame_admits_the_honest_majority_and_clips_to_the_median_norm():
    rows = planted(honest=6, outliers=4)  # 6 honest = min_cluster_size: all stay in the cluster
    result = Flame(FlameParams(noise_lambda=0.0), SERVER).aggregate(uploads(rows))
    assert torch.allclose(result.weights, torch.tensor([1 / 6] * 6 + [0.0] * 4))
    # the median of the norms 1..6, 10, 10, 10, 10 is (5 + 6) / 2: the honest of norm 6 is clipped to it
    s = 5.5
    expected = torch.stack([rows[i] * min(1.0, s / (i + 1)) for i in range(6)]).mean(0)
    assert torch.allclose(result.step, expected, atol=1e-6)
    again = Flame(FlameParams(noise_lambda=0.0), ServerInputs(layout=(), seed=99)).aggregate(uploads(rows, 5))
    assert torch.equal(again.step, result.step)  # no noise: nothing random


def test_flame_noise_is_seeded_and_scaled_by_lambda_times_median_norm():
    rows = planted(p=4000)
    clean = Flame(FlameParams(noise_lambda=0.0), SERVER).aggregate(uploads(rows)).step
    noisy = [Flame(FlameParams(noise_lambda=0.01), ServerInputs(layout=(), seed=seed)).aggregate(uploads(rows, r)).step
             for seed, r in ((0, 1), (0, 1), (1, 1), (0, 2))]
    assert torch.equal(noisy[0], noisy[1])
    assert not torch.equal(noisy[0], noisy[2]) and not torch.equal(noisy[0], noisy[3])
    assert (noisy[0] - clean).std().item() == pytest.approx(0.01 * 5.5, rel=0.1)


def test_flame_with_fewer_than_two_uploads_is_the_plain_mean():
    rows = torch.full((3, 4), float("nan"))
    rows[1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    result = Flame(FlameParams(), SERVER).aggregate(uploads(rows))
    assert torch.equal(result.step, rows[1]) and torch.equal(result.weights, torch.tensor([0.0, 1.0, 0.0]))


# --- registration and parameters -------------------------------------------------

@pytest.mark.parametrize("name", ["foolsgold", "fltrust", "flame"])
def test_registered_as_round_flaggers_on_whole_uploads(name):
    cls = REGISTRY[name]
    assert cls.flags == "round" and cls.handles_missing is False
    assert cls.needs_root_data is (name == "fltrust")
    cls.Params().validate(f"defense.{name}")  # the defaults are valid


@pytest.mark.parametrize("params, key", [
    (FoolsGoldParams(confidence=0.0), "defense.foolsgold.confidence"),
    (FoolsGoldParams(confidence=float("inf")), "defense.foolsgold.confidence"),
    (FLTrustParams(root_size=0), "defense.fltrust.root_size"),
    (FLTrustParams(root_size=10.5), "defense.fltrust.root_size"),
    (FlameParams(noise_lambda=-0.1), "defense.flame.noise_lambda"),
    (FlameParams(noise_lambda=float("inf")), "defense.flame.noise_lambda"),
    (FlameParams(noise_lambda="0.001"), "defense.flame.noise_lambda"),
])
def test_bad_parameters_raise_a_config_error_naming_the_key(params, key):
    name = key.rsplit(".", 1)[0]
    with pytest.raises(ConfigError, match=f"^{key}: "):
        params.validate(name)
