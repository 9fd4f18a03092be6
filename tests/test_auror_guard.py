"""AUROR's policy options (re-detection, recovery, the gap threshold) and ``auror_guard``, which sets them."""

import dataclasses
import re
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.attacks.auror_adaptive import stealthy
from pipeline.core.checkpoint import Checkpoint
from pipeline.core.loop import Callback, CollaborativeLoop
from pipeline.core.masking import aggregate_per_coordinate
from pipeline.core.server import Aggregate, ServerInputs, Uploads, present_rows
from pipeline.defenses import REGISTRY
from pipeline.defenses.auror import AurorDefense, AurorParams, separated_minority
from pipeline.experiment.arms import build_datamodule, build_model, make_attack, run_arm, user_behaviour
from pipeline.experiment.config import ConfigError, load_config, with_overrides
from pipeline.experiment.grid import DIRICHLET, IID, cell_key
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def tiny(*overrides):
    return load_config(None, [*TINY, *overrides])


class LeavesOut:
    """A server that never had ``users``: the per-coordinate mean of the others, from round 1."""

    def __init__(self, users):
        self.users = torch.tensor(sorted(users))

    def aggregate(self, uploads):
        accepted = present_rows(uploads.updates) & ~torch.isin(uploads.user_ids, self.users)
        return Aggregate(aggregate_per_coordinate(uploads.updates, accepted), accepted / accepted.sum())

    def state_dict(self):
        return {}

    def load_state_dict(self, state): ...


def build_loop(cfg, make_defense, checkpoint=None, callbacks=()):
    """The attack arm's loop of ``cfg`` (as run_arm builds it) with the server rule ``make_defense``."""
    data = build_datamodule(cfg, poison=True)
    attack = make_attack(cfg)
    attack.setup(data.train_x)
    torch.manual_seed(cfg.seed)
    module = build_model(cfg, data)
    return CollaborativeLoop(module, data, user_behaviour(cfg, attack, data.malicious, True), cfg.training.rounds,
                             cfg.training.batch_size, cfg.seed, attack, cfg.protocol, make_defense=make_defense,
                             checkpoint=checkpoint, callbacks=list(callbacks))


def auror_with(cfg):
    return lambda server: AurorDefense(cfg.defense.auror, server)


def final_params(loop):
    return torch.nn.utils.parameters_to_vector(loop.module.parameters()).detach()


def test_restart_at_the_first_window_equals_a_run_that_never_had_the_flagged_users():
    cfg = tiny("defense.auror.recovery=restart")
    restarted = build_loop(cfg, auror_with(cfg))
    restarted.run()
    flagged = restarted.defense.flagged
    assert flagged == {2, 4} == set(restarted.data.malicious.nonzero().flatten().tolist())  # flagged at round 2
    never = build_loop(cfg, lambda server: LeavesOut(flagged))
    never.run()
    assert torch.equal(final_params(restarted), final_params(never))
    assert restarted.rounds_retrained == cfg.defense.auror.window_rounds == 2
    assert [h["round"] for h in restarted.history] == [1, 2, 3, 4]  # the discarded rounds are forgotten
    assert restarted.history == never.history and restarted.excluded == never.excluded


def test_without_recovery_the_window_rounds_keep_the_attackers_share():
    cfg = tiny()
    kept = build_loop(cfg, auror_with(cfg))
    kept.run()
    never = build_loop(cfg, lambda server: LeavesOut(kept.defense.flagged))
    never.run()
    assert kept.defense.flagged == {2, 4} and kept.rounds_retrained == 0
    assert not torch.equal(final_params(kept), final_params(never))
    assert kept.excluded[:2] == [[], [2, 4]] and never.excluded[:2] == [[2, 4], [2, 4]]  # round 1 counted them


class StopAt(Callback):
    """Ctrl-C at the end of the ``n``-th round the loop finishes (rounds trained again count again);
    records the rounds it saw end."""

    def __init__(self, n):
        self.n, self.ended = n, []

    def on_round_end(self, loop, round_, metrics):
        self.ended.append(round_)
        if len(self.ended) == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [0, 1, -2])  # the first two rounds trained again, and the last but one
def test_a_run_resumed_after_a_recovery_continues_as_if_never_stopped(tmp_path, stop):
    cfg = tiny("defense.auror.recovery=restart", "defense.auror.redetect_every=1", "training.rounds=5")
    seen = StopAt(0)
    whole = build_loop(cfg, auror_with(cfg), callbacks=[seen])
    whole.run()
    # a recovery at round t discards rounds back+1..t (rounds_retrained counts them); round t itself never ended
    recoveries = sum(1 for d in whole.defense.detections if d["flagged_users"])
    assert whole.rounds_retrained >= 2 and len(seen.ended) == cfg.training.rounds + whole.rounds_retrained - recoveries
    first_again = next(i for i in range(1, len(seen.ended)) if seen.ended[i] <= seen.ended[i - 1])
    n = {0: first_again + 1, 1: first_again + 2, -2: len(seen.ended) - 1}[stop]
    checkpoint = Checkpoint(tmp_path / "seed0-auror.pt", "auror|seed 0|test")
    with pytest.raises(KeyboardInterrupt):
        build_loop(cfg, auror_with(cfg), checkpoint, [StopAt(n)]).run()
    resumed = build_loop(cfg, auror_with(cfg), checkpoint, [StopAt(0)])  # the same callbacks, one that never stops
    resumed.run()
    assert torch.equal(final_params(resumed), final_params(whole))
    assert resumed.history == whole.history and resumed.excluded == whole.excluded
    assert resumed.defense.report() == whole.defense.report() and resumed.rounds_retrained == whole.rounds_retrained


def feed(defense, rounds, users=6, params=40, seed=0):
    """Hand ``defense`` uploads for rounds 1..rounds (users 0 and 1 shifted on half the parameters)."""
    g = torch.Generator().manual_seed(seed)
    for round_ in range(1, rounds + 1):
        updates = torch.randn(users, params, generator=g) * 0.01
        updates[:2, : params // 2] += 1.0
        decision = defense.aggregate(Uploads(round_, torch.arange(users), updates))
        assert decision.rewind_to is None
    return defense


@pytest.mark.parametrize("every, rounds, windows", [
    (0, 10, [[1, 3]]),  # the paper: once
    (3, 10, [[1, 3], [4, 6], [7, 9]]),  # tiling windows
    (2, 8, [[1, 3], [3, 5], [5, 7]]),  # overlapping
    (5, 14, [[1, 3], [6, 8], [11, 13]]),  # with rounds no window sees
])
def test_decisions_at_the_end_of_each_window_among_the_users_not_flagged_yet(every, rounds, windows):
    params = AurorParams(alpha=0.5, window_rounds=3, redetect_every=every)
    defense = feed(AurorDefense(params, ServerInputs(())), rounds)
    assert [d["window"] for d in defense.detections] == windows
    assert [d["round"] for d in defense.detections] == [w[1] for w in windows]
    assert defense.flagged == {0, 1} and defense.detections[0]["flagged_users"] == [0, 1]
    for later in defense.detections[1:]:  # the flagged users are not judged again; the others stay unflagged
        assert set(later["scores"]) == {"2", "3", "4", "5"} and later["flagged_users"] == []
    assert len(defense._window) <= 3


def test_the_default_policy_is_the_papers_and_keeps_the_recorded_results():
    """The new keys at their defaults leave the key of a recorded cell as it was (the committed matrix is found)."""
    mnist = load_config(ROOT / "configs/mnist.yaml")
    for attack, setting, store in [("label_flip", IID[0.3], "label_flip/auror.json"),
                                   ("auror_adaptive", DIRICHLET, "auror_adaptive/auror.json"),
                                   ("auror_adaptive", IID[0.3], "auror_adaptive/multi_krum.json")]:
        cfg = with_overrides(mnist, [f"attack.name={attack}", *setting.overrides])
        recorded = json.loads((ROOT / "reports/compare/mnist" / store).read_text())
        arm = Path(store).stem
        assert cell_key(cfg, arm) in recorded
        changed = with_overrides(cfg, ["defense.auror.recovery=restart", "attack.auror_adaptive.redetect_every=3"])
        assert (cell_key(changed, arm) in recorded) == (arm != "auror" and attack != "auror_adaptive")


def test_auror_guard_is_auror_with_the_three_options():
    guard, paper = REGISTRY["auror_guard"].Params(), AurorParams()
    assert (guard.redetect_every, guard.recovery, guard.threshold) == (guard.window_rounds, "restart", "gap")
    paper_reading = dataclasses.replace(guard, redetect_every=0, recovery="none", threshold="tau")
    assert dataclasses.asdict(paper_reading) == dataclasses.asdict(paper)
    assert issubclass(REGISTRY["auror_guard"], AurorDefense)


@pytest.mark.parametrize("override, message", [
    ("defense.auror.redetect_every=-1", "defense.auror.redetect_every: must be an integer >= 0"),
    ("defense.auror.recovery=rollback", "defense.auror.recovery: must be one of none, restart"),
    ("defense.auror_guard.threshold=median", "defense.auror_guard.threshold: must be one of tau, gap"),
    ("defense.auror_guard.min_gap=0", "defense.auror_guard.min_gap: must be a finite number > 0"),
    ("defense.auror_guard.min_ratio=0.5", "defense.auror_guard.min_ratio: must be a finite number >= 1"),
    ("defense.auror.min_indicative=1", "defense.auror.min_indicative: must be in [0, 1)"),
    ("attack.auror_adaptive.redetect_every=-2", "attack.auror_adaptive.redetect_every: must be an integer >= 0"),
])
def test_bad_policy_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(override)


@pytest.mark.parametrize("window, every, stealthy_rounds", [
    (3, 0, [1, 2, 3]),  # faithful AUROR's one window
    (3, 3, list(range(1, 16))),  # tiling windows: never unbounded
    (3, 5, [1, 2, 3, 6, 7, 8, 11, 12, 13]),
    (0, 4, list(range(1, 16))),  # within the spread always
])
def test_the_adaptive_attacker_is_stealthy_in_every_window_it_knows_of(window, every, stealthy_rounds):
    assert [r for r in range(1, 16) if stealthy(r, window, every)] == stealthy_rounds


def test_a_guarded_run_records_every_decision_and_what_recovery_cost():
    result = run_arm(tiny("training.rounds=6"), "auror_guard")
    detection = result.detection
    assert detection["rounds_retrained"] >= 2  # at least the first window trained again
    assert [d["round"] for d in detection["detections"]][:1] == [3]
    assert detection["flagged_users"] == sorted(set().union(*(d["flagged_users"] for d in detection["detections"])))
    assert [h["round"] for h in result.history] == list(range(1, 7))


RECORDED = json.loads((ROOT / "tests/data/auror_scores_mnist.json").read_text())
TARGETED = ("label_flip", "backdoor", "model_replacement")


def gap_rule_on(window, min_gap=1.0, min_ratio=4.0, min_indicative=0.01):
    """The users the gap rule flags in one recorded window."""
    users = [int(u) for u in window["scores"]]
    if window["num_indicative_features"] < min_indicative * RECORDED["num_features"]:
        return set()
    scores = np.array(list(window["scores"].values()))
    return {users[i] for i in separated_minority(scores, min_gap, min_ratio).nonzero()[0]}


@pytest.mark.parametrize("min_gap, min_ratio", [(1.0, 4.0), (0.5, 4.0), (2.0, 4.0), (1.0, 2.0), (1.0, 1.0)])
def test_the_gap_rule_on_the_recorded_mnist_scores(min_gap, min_ratio):
    """Every window of every recorded run (7 attacks and nobody, IID and Dirichlet(0.5), seeds 0-2): no honest
    user flagged, nobody flagged when nobody attacks; the targeted attackers flagged at the first window."""
    for run, recorded in RECORDED["runs"].items():
        attack, setting, seed = run.split("|")
        malicious = set(recorded["malicious"])
        flags = [gap_rule_on(w, min_gap, min_ratio) for w in recorded["windows"]]
        assert all(f <= malicious for f in flags), run
        if attack in TARGETED:
            assert len(flags[0]) >= len(malicious) - 1, run  # at most one attacker waits for a later window
        if attack == "auror_adaptive":  # stealthy in rounds 1-3, the paper's attacker after
            assert not flags[0] and flags[1] == malicious, run


def test_no_tau_separates_label_flippers_from_honest_users_under_label_skew():
    """On the same first windows, a fixed tau above every honest score of the runs with nobody attacking
    (Dirichlet(0.5)) misses some label flipper of the attacked runs: no level serves both; the gap rule does."""
    honest_top = max(max(w["scores"].values()) for run, r in RECORDED["runs"].items() if run.startswith("none|Dir")
                     for w in r["windows"][:1])
    attacker_low = min(min(s for u, s in w["scores"].items() if int(u) in r["malicious"])
                       for run, r in RECORDED["runs"].items() if run.startswith("label_flip|Dir")
                       for w in r["windows"][:1])
    assert attacker_low < honest_top  # no tau separates them; the gap rule does (above)


def test_too_few_indicative_features_decide_nothing():
    """Honest IID windows have 0-2 indicative features: each user's score is then 0, 0.5 or 1 by chance."""
    honest_iid = [w for run, r in RECORDED["runs"].items() if run.startswith("none|IID") for w in r["windows"]]
    assert max(w["num_indicative_features"] for w in honest_iid) <= 2
    chance = next(w for w in honest_iid if w["num_indicative_features"] and max(w["scores"].values()) > 0)
    assert gap_rule_on(chance, min_indicative=0.0) and not gap_rule_on(chance)


@pytest.mark.parametrize("scores, flagged", [
    ([0.0, 0.01, 0.02, 0.01, 0.5, 0.6], [4, 5]),  # a separated minority
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], []),  # a continuum: no gap
    ([0.05, 0.07, 0.14, 0.18, 0.2, 0.6, 0.65], []),  # a wide gap, but a 3-fold jump (honest users, digits)
    ([0.05, 0.07, 0.14, 0.18, 0.2, 0.81, 0.9], [5, 6]),  # the same, 4-fold
    ([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], []),  # half and half: no minority
    ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], []),
    ([0.3, 0.9], []),  # too few users to tell a minority
])
def test_the_gap_rule_by_hand(scores, flagged):
    assert separated_minority(np.array(scores), 1.0, 4.0).nonzero()[0].tolist() == flagged


def test_the_committed_reports_name_the_current_config_and_new_keys_at_old_values_stay_out():
    """`auror compare --report-only` may rewrite them (it refuses a report of another config): keys added
    later (training.model, AUROR's policy) at the values that behave as before are in neither a cell's key
    nor a report's config."""
    from pipeline.experiment.store import report_config

    for report, params in [("compare_mnist", "configs/mnist.yaml"), ("compare_digits", "configs/digits.yaml")]:
        shown = report_config(load_config(ROOT / params))
        assert shown["hash"] == json.loads((ROOT / "reports" / f"{report}.json").read_text())["config"]["hash"]
        assert "training.model" not in shown["values"] and "defense.auror.recovery" not in shown["values"]
        assert "defense.auror_guard.recovery" in shown["values"]  # a new section is the config's, keyed
    changed = report_config(load_config(ROOT / "configs/mnist.yaml", ["training.model=lenet5"]))["values"]
    assert changed["training.model"] == "lenet5"
