"""FLDetector: the L-BFGS Hessian-vector product, the gap statistic, the 2-means split, the scores under
sampling, a hand-built run of 10 users of whom 3 do not follow the others' smooth evolution, its state
across a resume, the restart recovery, validation, and real runs (tiny config, digits)."""

import io
import math

import pytest
import torch
from torch.testing import assert_close

import pipeline.defenses.fldetector as fld
from pipeline.core.device import seeded_generator
from pipeline.core.errors import ConfigError
from pipeline.core.server import ServerInputs, Uploads
from pipeline.defenses import REGISTRY
from pipeline.defenses.clustering import two_means_1d
from pipeline.defenses.fldetector import (FLDETECTOR_STREAM, Gap, gap_statistic, kmeans_split, lbfgs_hvp,
                                          normalised_distances, suspicious_scores, within_sum_of_squares)

F64 = torch.float64


def make(seed=1, **params):
    cls = REGISTRY["fldetector"]
    return cls(cls.Params(**params), ServerInputs(layout=(), seed=seed))


def spd(p, seed):
    """A symmetric positive definite (p, p) matrix with eigenvalues 0.5 .. 3."""
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q @ torch.diag(torch.linspace(0.5, 3.0, p, dtype=F64)) @ q.T


def sequential_bfgs(dws, dgs):
    """The N BFGS updates B <- B - B s s^T B / s^T B s + y y^T / y^T s of sigma I, sigma = y_N.s_N / s_N.s_N:
    the matrix the compact form multiplies by, written out."""
    b = (dgs[-1] @ dws[-1]) / (dws[-1] @ dws[-1]) * torch.eye(dws.shape[1], dtype=F64)
    for s, y in zip(dws, dgs):
        bs = b @ s
        b = b - torch.outer(bs, bs) / (s @ bs) + torch.outer(y, y) / (y @ s)
    return b


# --- L-BFGS ------------------------------------------------------------------------------------------------------

def test_fldetector_lbfgs_hvp_one_pair_by_hand():
    # s = (1, 0), y = (3, 1): sigma = y.s / s.s = 3, B0 = 3I;
    # B = 3I - B0 s s^T B0 / s^T B0 s + y y^T / y^T s = 3I - 3 e1 e1^T + [[3, 1], [1, 1/3]] = [[3, 1], [1, 10/3]]
    s, y = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[3.0, 1.0]], dtype=F64)
    assert_close(lbfgs_hvp(s, y, torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([3.0, 1.0], dtype=F64))  # = y
    assert_close(lbfgs_hvp(s, y, torch.tensor([0.0, 1.0], dtype=F64)), torch.tensor([1.0, 10 / 3], dtype=F64))
    assert_close(lbfgs_hvp(s, y, torch.tensor([2.0, -3.0], dtype=F64)), torch.tensor([3.0, -8.0], dtype=F64))


@pytest.mark.parametrize("p, n", [(8, 4), (20, 10), (6, 6)])
def test_fldetector_lbfgs_hvp_reproduces_a_quadratics_hessian_on_the_span(p, n):
    """On a quadratic (dg = H dw exactly) with H-conjugate steps it gives H v for every v in their span.

    BFGS is exact there by its hereditary property (B s_j = y_j for every pair, not only the newest, when
    the steps are H-conjugate); for updates (dg = -lr H dw) it gives -lr H v."""
    h = spd(p, p)
    steps = []
    for s in torch.randn(n, p, generator=torch.Generator().manual_seed(n), dtype=F64):
        for q in steps:
            s = s - (q @ h @ s) / (q @ h @ q) * q
        steps.append(s)
    dws = torch.stack(steps)
    dgs = dws @ h
    for k in range(3):
        v = dws.T @ torch.randn(n, generator=torch.Generator().manual_seed(100 + k), dtype=F64)
        assert_close(lbfgs_hvp(dws, dgs, v), h @ v, rtol=1e-10, atol=1e-10)
        assert_close(lbfgs_hvp(dws, -0.1 * dgs, v), -0.1 * (h @ v), rtol=1e-10, atol=1e-10)  # updates: -lr H
    if n < p:  # off the span, BFGS knows nothing: the product is not H v (this is not a trivial identity)
        off = torch.randn(p, generator=torch.Generator().manual_seed(7), dtype=F64)
        assert (lbfgs_hvp(dws, dgs, off) - h @ off).norm() > 1e-3 * (h @ off).norm()


def test_fldetector_lbfgs_hvp_is_the_n_bfgs_updates_of_sigma_i_and_drops_empty_pairs():
    """The compact form is B v for the N sequential BFGS updates of sigma I; pairs with dw = 0 are dropped.

    On arbitrary (non-conjugate) pairs: a mutation taking sigma from the oldest pair, or L from the upper
    triangle, fails this."""
    g = torch.Generator().manual_seed(3)
    h = spd(7, 2)
    dws = torch.randn(5, 7, generator=g, dtype=F64)
    dgs = dws @ h + 0.05 * torch.randn(5, 7, generator=g, dtype=F64)  # curvature pairs, not exactly one H
    v = torch.randn(7, generator=g, dtype=F64)
    expected = sequential_bfgs(dws, dgs) @ v
    assert_close(lbfgs_hvp(dws, dgs, v), expected, rtol=1e-10, atol=1e-12)
    assert (lbfgs_hvp(dws, dgs, v) - h @ v).norm() > 1e-3  # random steps: an estimate, not H v
    zero = torch.zeros(1, 7, dtype=F64)
    assert_close(lbfgs_hvp(torch.cat([dws[:2], zero, dws[2:]]), torch.cat([dgs[:2], zero, dgs[2:]]), v), expected,
                 rtol=1e-10, atol=1e-12)
    assert torch.equal(lbfgs_hvp(zero, zero, v), torch.zeros(7, dtype=F64))  # nothing to learn from
    assert lbfgs_hvp(dws.float(), dgs.float(), v.float()).dtype == torch.float32  # v's dtype out


# --- the scores, the gap statistic, the split -----------------------------------------------------------------

def test_fldetector_scores_average_what_each_user_has_under_sampling():
    # distances (3, 6, 9) of users 0, 1, 2: sum 18, x 3 users -> (0.5, 1, 1.5); mean 1 by construction
    assert_close(normalised_distances(torch.tensor([3.0, 6.0, 9.0], dtype=F64)), torch.tensor([0.5, 1.0, 1.5],
                                                                                              dtype=F64))
    assert torch.equal(normalised_distances(torch.zeros(3, dtype=F64)), torch.zeros(3, dtype=F64))
    # round a: users 0, 1, 2 -> 0.5, 1, 1.5; round b: users 1, 2, 5 -> 1, 1, 1 (user 0 absent, user 5 new)
    history = [(torch.tensor([0, 1, 2]), torch.tensor([0.5, 1.0, 1.5], dtype=F64)),
               (torch.tensor([1, 2, 5]), torch.tensor([1.0, 1.0, 1.0], dtype=F64))]
    ids, scores = suspicious_scores(history)
    assert ids.tolist() == [0, 1, 2, 5]
    assert_close(scores, torch.tensor([0.5, 1.0, 1.25, 1.0], dtype=F64))
    assert suspicious_scores([])[0].numel() == 0


def test_fldetector_within_sum_of_squares_by_hand_and_equal_to_sklearn():
    from sklearn.cluster import KMeans

    # 0, 1, 10, 11: mean 5.5, W1 = 2 x 5.5^2 + 2 x 4.5^2 = 101; the 2-means {0, 1} {10, 11}: W2 = 4 x 0.5^2 = 1
    w1, w2 = within_sum_of_squares(torch.tensor([[0.0, 1.0, 10.0, 11.0]], dtype=F64))
    assert w1.item() == pytest.approx(101) and w2.item() == pytest.approx(1)
    rows = torch.rand(6, 9, generator=torch.Generator().manual_seed(0), dtype=F64)
    _, w2 = within_sum_of_squares(rows)
    for row, w in zip(rows, w2):  # the exact 1-D optimum is the minimum sklearn's restarts look for
        inertia = KMeans(n_clusters=2, n_init=10, random_state=0).fit(row.numpy()[:, None]).inertia_
        assert w.item() == pytest.approx(inertia, rel=1e-9)


def test_fldetector_gap_statistic_one_cluster_for_uniformish_scores_two_for_separated_groups():
    for round_ in range(1, 11):
        generator = seeded_generator(0, round_, FLDETECTOR_STREAM)
        spread = torch.linspace(0.9, 1.1, 10, dtype=F64)  # evenly spaced: as uniform as 10 scores get
        assert gap_statistic(spread, 20, generator).clusters == 1
        bell = 1 + 0.05 * torch.randn(10, generator=torch.Generator().manual_seed(round_), dtype=F64)
        assert gap_statistic(bell, 20, generator).clusters == 1  # one bump: still one cluster
        groups = torch.tensor([0.62, 0.64, 0.63, 0.66, 0.65, 0.66, 0.64, 1.70, 1.94, 1.81], dtype=F64)
        gap = gap_statistic(groups, 20, generator)
        assert gap.clusters == 2 and gap.gap[1] - gap.sd[1] > gap.gap[0]
    # all equal: one cluster; two exact groups: W2 = 0, Gap(2) = +inf
    assert gap_statistic(torch.ones(5, dtype=F64), 20, seeded_generator(0, 1, 1)).clusters == 1
    exact = gap_statistic(torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=F64), 20, seeded_generator(0, 1, 1))
    assert exact.clusters == 2 and exact.gap[1] == math.inf


def test_fldetector_gap_statistic_is_tibshiranis_rule_on_its_reference_draws():
    """Gap(k) = mean_b log W*_kb - log W_k, references from the generator; 1 cluster iff Gap(1) >= Gap(2) - s_2."""
    scores = torch.tensor([0.2, 0.5, 0.4, 1.4, 0.3, 1.2], dtype=F64)
    gap = gap_statistic(scores, 7, seeded_generator(5, 3, FLDETECTOR_STREAM))
    fake = 0.2 + 1.2 * torch.rand(7, 6, generator=seeded_generator(5, 3, FLDETECTOR_STREAM), dtype=F64)
    w1, w2 = within_sum_of_squares(torch.cat([scores[None], fake]))
    log1, log2 = w1.log(), w2.log()
    assert gap.gap[0] == pytest.approx(log1[1:].mean().item() - log1[0].item())
    assert gap.gap[1] == pytest.approx(log2[1:].mean().item() - log2[0].item())
    assert gap.sd[1] == pytest.approx(log2[1:].std(correction=0).item() * math.sqrt(1 + 1 / 7))
    # one cluster when Gap(1) >= Gap(2) - s_2: 1 < 1.5 - 0.2 says more (the original code's s_1, 1.0, would not)
    assert Gap((1.0, 1.5), (1.0, 0.2)).clusters == 2 and Gap((1.0, 1.1), (0.0, 0.2)).clusters == 1


@pytest.mark.parametrize("seed", range(5))
def test_fldetector_kmeans_split_is_sklearns_high_cluster(seed):
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(seed)
    scores = torch.cat([torch.rand(6, generator=g, dtype=F64), 2 + torch.rand(4, generator=g, dtype=F64)])
    scores = scores[torch.randperm(10, generator=g)]
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(scores.numpy()[:, None]).labels_
    high = torch.as_tensor(labels == int(scores[labels == 1].mean() > scores[labels == 0].mean()))
    got = kmeans_split(scores, seed)
    assert torch.equal(got, high) and torch.equal(got, scores > 1.5)
    assert torch.equal(got, two_means_1d(scores[None]).upper[0])  # and the exact 1-D optimum


# --- a hand-built run -----------------------------------------------------------------------------------------

def simulate(defense, rounds=14, n=10, bad=(7, 8, 9), p=6, seed=0, attack="fixed", absent=None):
    """10 users of one quadratic: honest user i uploads -eta (H w - b_i) (+ noise 1e-4), which follows the
    model smoothly; the users in ``bad`` upload the same update every round ("fixed": they ignore the model)
    or a fresh random one ("random"). ``absent``: round -> users who take no part. Returns the aggregates."""
    g = torch.Generator().manual_seed(seed)
    h, eta = spd(p, seed), 0.1
    b, fixed = torch.randn(n, p, generator=g, dtype=F64), 0.3 * torch.randn(n, p, generator=g, dtype=F64)
    w = 3 * torch.randn(p, generator=g, dtype=F64)
    out = []
    for r in range(1, rounds + 1):
        u = -eta * (h @ w - b) + 1e-4 * torch.randn(n, p, generator=g, dtype=F64)
        u[list(bad)] = fixed[list(bad)] if attack == "fixed" else 0.3 * torch.randn(len(bad), p, generator=g,
                                                                                    dtype=F64)
        ids = torch.tensor([i for i in range(n) if i not in (absent or {}).get(r, ())])
        a = defense.aggregate(Uploads(r, ids, u[ids]))
        w = w + a.step
        out.append(a)
    return out


def test_fldetector_flags_the_users_who_ignore_the_model_and_nobody_else():
    """3 of 10 users upload the same update whatever the model: flagged at round 12, and nobody else.

    The pairs' dg is the change of the mean of all 10, of which the 3 fixed rows do not change: the server's
    product is about 0.7 (-eta H v). An honest user then lands 0.3 ||eta H v|| from its prediction, a fixed one
    0.7 ||eta H v||: normalised to mean 1, 7 x 0.3 + 3 x 0.7 = 4.2, honest 3 / 4.2 = 0.714, fixed 7 / 4.2 = 1.667."""
    defense = make()
    out = simulate(defense)
    first = defense.params.first_decision
    assert first == 12  # warmup 0: window + 1 = 11, decide from round 12
    (decision,) = defense.decisions  # the first decision flags them; none after it
    assert decision["round"] == 12 and decision["clusters"] == 2 and decision["flagged_users"] == [7, 8, 9]
    assert defense.flagged == {7, 8, 9} and defense.report()["detection_round"] == 12
    scores = decision["scores"]
    assert all(scores[str(i)] == pytest.approx(0.714, abs=0.02) for i in range(7))
    assert all(scores[str(i)] == pytest.approx(1.667, abs=0.03) for i in (7, 8, 9))
    for r, a in enumerate(out, 1):  # everyone counts until the detection round, the flagged never after
        expected = torch.full((10,), 0.1, dtype=F64) if r < 12 else torch.tensor([1 / 7] * 7 + [0] * 3, dtype=F64)
        assert_close(a.weights, expected) and a.rewind_to is None
    assert defense._dws == [] and defense._last is None  # nothing kept once decided


def test_fldetector_without_the_hessian_term_flags_the_honest_users(monkeypatch):
    """The mutation H v = 0 (each update predicted as its last one) flags the 7 honest users instead.

    The fixed rows are then perfectly predicted and the honest ones, which follow the model, are not: the
    test above needs the L-BFGS product."""
    monkeypatch.setattr(fld, "lbfgs_hvp", lambda dws, dgs, v: torch.zeros_like(v))
    defense = make()
    simulate(defense)
    assert defense.flagged == set(range(7))


def test_fldetector_flags_random_uploaders_and_decides_nothing_when_nobody_attacks():
    defense = make()
    simulate(defense, attack="random")
    assert defense.flagged == {7, 8, 9} and defense.decisions[0]["round"] == 12
    honest = make()
    simulate(honest, rounds=20, bad=())
    assert honest.flagged == set() and len(honest.decisions) == 9
    assert all(d["clusters"] == 1 for d in honest.decisions)


def test_fldetector_under_sampling_judges_whom_it_can_predict():
    """Under sampling a user gets a distance only with an update this round and the last; its score averages them.

    User 2 skips rounds 10 and 12: no distance in rounds 10 to 13 (none to predict round 11 from round
    10's, nor 13 from 12's); its score averages the others. User 9 (fixed) skips round 12, when the first
    decision comes: it is still judged, and flagged, by the distances it has in the window."""
    defense = make()
    simulate(defense, absent={10: (2,), 12: (2, 9)})
    assert defense.flagged == {7, 8, 9}
    assert set(defense.decisions[0]["scores"]) == {str(i) for i in range(10)}
    probe = make(warmup=100)  # never decides: the history stays to be read
    simulate(probe, absent={10: (2,), 12: (2, 9)})
    rounds_of_2 = [r for r, ids, _ in probe._history if 2 in ids.tolist()]
    assert rounds_of_2 == [r for r in range(5, 15) if r not in (10, 11, 12, 13)]
    assert [r for r, ids, _ in probe._history if 9 not in ids.tolist()] == [12, 13]  # none in 12, nor from it


def test_fldetector_a_round_with_no_whole_update_breaks_nothing():
    """A round in which the guard left every row out: step 0, no pair, no prediction from it next round.

    Round 6 all NaN: nobody counted; round 7 has no last round to predict from and forms no pair (its dw
    would be round 6's zero step), round 8 predicts again; the fixed rows are still flagged at round 12."""
    defense = make()

    class Blank:
        def aggregate(self, uploads):
            if uploads.round == 6:
                uploads = Uploads(6, uploads.user_ids, torch.full_like(uploads.updates, math.nan))
            a = defense.aggregate(uploads)
            if uploads.round == 6:
                assert torch.equal(a.step, torch.zeros(6, dtype=F64)) and not a.weights.any()
            if uploads.round in (7, 8):
                assert [r for r, _, _ in defense._history][-1] == (5 if uploads.round == 7 else 8)
                assert len(defense._dws) == (4 if uploads.round == 7 else 5)  # pairs of rounds 2-5, then 8
            return a

    simulate(Blank())
    assert defense.flagged == {7, 8, 9}


def test_fldetector_window_and_warmup_set_when_it_decides():
    defense = make(window=3, warmup=4)
    simulate(defense, rounds=8)
    assert defense.params.first_decision == 5 and defense.decisions[0]["round"] == 5
    assert len(defense._history) == 0 and defense.flagged == {7, 8, 9}
    short = make(window=3)  # warmup 0: window + 1 = 4, first decision at round 5
    assert short.params.first_decision == 5
    late = make(warmup=30)
    simulate(late, rounds=14)
    assert late.decisions == [] and late.flagged == set() and late.report()["detection_round"] is None


# --- state across a resume ------------------------------------------------------------------------------------

def through_a_checkpoint(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("stop", [1, 2, 5, 11, 12, 13])
def test_fldetector_a_resumed_defense_continues_as_if_never_stopped(stop):
    """A defense stopped after round ``stop`` and loaded from its checkpointed state ends as one run straight.

    Every later step, weight, flag and record, bit for bit (the state through torch.save / torch.load
    with weights_only, as a checkpoint)."""
    straight = make(seed=4)
    expected = simulate(straight, attack="random", seed=2)
    first, resumed = make(seed=4), make(seed=4)

    class Switch:
        def aggregate(self, uploads):
            if uploads.round == stop + 1:
                resumed.load_state_dict(through_a_checkpoint(first.state_dict()))
            return (first if uploads.round <= stop else resumed).aggregate(uploads)

    got = simulate(Switch(), attack="random", seed=2)  # the same uploads, the defense switched after `stop`
    for a, b in zip(got, expected):
        assert torch.equal(a.step, b.step) and torch.equal(a.weights, b.weights) and a.rewind_to == b.rewind_to
    assert resumed.flagged == straight.flagged == {7, 8, 9}
    assert resumed.report() == straight.report()


# --- recovery ---------------------------------------------------------------------------------------------------

def test_fldetector_restart_rewinds_to_the_initial_model_at_the_detection():
    defense = make(recovery="restart")
    assert defense.rewind_rounds >= 2**31 - 1 and make().rewind_rounds == 0
    out = simulate(defense)
    assert [a.rewind_to for a in out] == [None] * 11 + [0, None, None]
    assert defense.flagged == {7, 8, 9} and len(defense.decisions) == 1
    # from the detection on (the simulation itself does not go back) the flagged are left out, nothing decided
    assert all(torch.equal(a.weights, torch.tensor([1 / 7] * 7 + [0] * 3, dtype=F64)) for a in out[11:])


def test_fldetector_restart_in_a_real_run_retrains_from_round_0(tmp_path):
    from pipeline.experiment.arms import run_arm
    from pipeline.experiment.config import load_config

    cfg = load_config("configs/digits.yaml", ["training.rounds=10", "training.device=cpu", "attack.name=backdoor",
                                              "defense.fldetector.window=4", "defense.fldetector.recovery=restart"])
    result = run_arm(cfg, "fldetector")
    det = result.detection
    assert det["flagged_users"] == det["malicious_users"] == [4, 8, 9]
    assert det["rounds_retrained"] == det["detection_round"] == 6
    assert [h["round"] for h in result.history] == list(range(1, 11))  # the final trajectory only
    assert result.metrics["detection_rate"] == 1 and result.metrics["false_positive_rate"] == 0
    assert result.metrics["attack_success_rate"] == 0  # trained again without them: no backdoor left


# --- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("window", 0, "must be an integer >= 1"),
    ("window", 2.5, "must be an integer >= 1"),
    ("warmup", -1, "must be an integer >= 0 (0: window + 1)"),
    ("gap_references", 0, "must be an integer >= 1"),
    ("recovery", "rewind", "must be one of none, restart"),
])
def test_fldetector_bad_parameters_are_refused_in_one_line(field, value, message):
    params = REGISTRY["fldetector"].Params(**{field: value})
    with pytest.raises(ConfigError) as err:
        params.validate("defense.fldetector")
    assert str(err.value) == f"defense.fldetector.{field}: {message}, got {value!r}"


def test_fldetector_refuses_partial_uploads_and_bad_config_before_any_run():
    from pipeline.experiment.arms import check_arms
    from pipeline.experiment.config import load_config
    from tests.conftest import TINY

    with pytest.raises(ConfigError, match="^protocol.theta_u: must be 1 for defense fldetector"):
        check_arms(load_config(None, [*TINY, "protocol.theta_u=0.5"]), ["fldetector"])
    with pytest.raises(ConfigError, match=r"^defense.fldetector.window: must be an integer >= 1, got 0$"):
        load_config(None, [*TINY, "defense.fldetector.window=0"])


# --- real runs --------------------------------------------------------------------------------------------------

def test_fldetector_end_to_end_on_the_tiny_config():
    from pipeline.experiment.arms import run_arm
    from pipeline.experiment.config import load_config
    from tests.conftest import TINY

    cfg = load_config(None, [*TINY, "defense.fldetector.window=1", "defense.fldetector.warmup=2"])
    result = run_arm(cfg, "fldetector")
    assert math.isfinite(result.metrics["accuracy"])
    assert 0 <= result.metrics["detection_rate"] <= 1 and 0 <= result.metrics["false_positive_rate"] <= 1
    det = result.detection
    assert det["defense"] == "fldetector" and det["flags"] == "run"
    assert [d["round"] for d in det["decisions"]] and det["decisions"][0]["round"] == 3  # the first it can
    assert set(det["flagged_users"]) == set(det["decisions"][-1]["flagged_users"])
    again = run_arm(cfg, "fldetector")  # seeded draws: the same run
    assert again.metrics == result.metrics and again.detection == det


def test_fldetector_end_to_end_on_digits_catches_label_flipping():
    """Digits, 3 of 10 users flipping 1 -> 7: every attacker flagged at round 12, no honest user, SR as benign.

    At the first decision (round 12, the window of 10 full); the attackers' updates are boosted x 3."""
    from pipeline.experiment.arms import run_arm
    from pipeline.experiment.config import load_config

    cfg = load_config("configs/digits.yaml", ["training.rounds=20", "training.device=cpu"])
    result = run_arm(cfg, "fldetector")
    assert result.detection["detection_round"] == 12
    assert result.detection["flagged_users"] == result.detection["malicious_users"] == [4, 8, 9]
    assert result.metrics["detection_rate"] == 1 and result.metrics["false_positive_rate"] == 0
    assert result.metrics["attack_success_rate"] < 0.05 < 0.9 < run_arm(cfg, "attack").metrics["attack_success_rate"]
