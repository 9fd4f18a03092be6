"""The cross-device setting: users sampled per round, FedSGD, the server's optimiser, evaluation every N rounds."""

import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.core.checkpoint import Checkpoint
from pipeline.core.loop import Callback
from pipeline.core.metrics import defense_detection_rates
from pipeline.core.sampling import round_size, sample_users
from pipeline.core.server import Aggregate, Uploads
from pipeline.core.server_optimizer import ServerConfig, server_step
from pipeline.defenses import REGISTRY
from pipeline.defenses.auror import AurorDefense, AurorParams
from pipeline.experiment.arms import make_loop, run_arm
from pipeline.experiment.config import load_config, without_unkeyed
from tests.conftest import TINY

# 10 users (3 malicious), 4 of them per round: rounds without an attacker and rounds with two occur
SAMPLED = [*TINY, "users.num_users=10", "users.malicious_fraction=0.3", "users.per_round=4", "training.rounds=6"]


def cfg(*overrides):
    return load_config(None, [*SAMPLED, *overrides])


def test_round_size_reads_a_fraction_or_a_count():
    assert [round_size(f, 1000) for f in (1.0, 0.1, 0.001, 100.0, 1000.0)] == [1000, 100, 1, 100, 1000]


def test_everyone_takes_part_without_a_draw_and_a_sample_is_seeded_sorted_and_distinct():
    malicious = torch.tensor([True] * 30 + [False] * 70)
    assert torch.equal(sample_users(100, 100, malicious, "sampled", 0, 1), torch.arange(100))
    a, b = sample_users(100, 10, malicious, "sampled", 0, 1), sample_users(100, 10, malicious, "sampled", 0, 1)
    assert torch.equal(a, b) and len(a.unique()) == 10 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, sample_users(100, 10, malicious, "sampled", 0, 2))  # each round its own draw
    assert not torch.equal(a, sample_users(100, 10, malicious, "sampled", 1, 1))


def test_every_round_holds_the_attackers_share_while_sampled_varies():
    malicious = torch.tensor([True] * 30 + [False] * 70)
    counts = {p: [int(malicious[sample_users(100, 10, malicious, p, 0, r)].sum()) for r in range(1, 201)]
              for p in ("sampled", "every_round")}
    assert set(counts["every_round"]) == {3}
    assert min(counts["sampled"]) == 0 and max(counts["sampled"]) >= 6
    assert abs(sum(counts["sampled"]) / 200 - 3) < 0.3  # the share on average


def test_default_keys_are_left_out_of_a_cells_key_and_any_other_value_keys_them():
    default = load_config(None, list(TINY))
    flat = without_unkeyed(default.flat(), default)
    assert not any(k.startswith(("server.", "users.per_round", "training.algorithm", "training.eval_every",
                                 "attack.participation")) for k in flat)
    sampled = cfg()
    assert without_unkeyed(sampled.flat(), sampled)["users.per_round"] == 4.0


class Seen(Callback):
    def __init__(self):
        self.rounds = []

    def on_round_end(self, loop, round_, metrics):
        self.rounds.append(metrics)


def record_uploads(loop) -> list[Uploads]:
    """The list the loop's defense will append every round's uploads to, as it receives them."""
    received, inner = [], loop.defense

    class Recording:
        def aggregate(self, uploads):
            received.append(uploads)
            return inner.aggregate(uploads)

        state_dict, load_state_dict = inner.state_dict, inner.load_state_dict

    loop.defense = Recording()
    return received


def test_only_the_sampled_users_train_upload_and_reach_the_defense():
    config = cfg()
    loop = make_loop(config, "attack")
    received = record_uploads(loop)
    loop.run()
    received = [u.user_ids.tolist() for u in received]
    expected = [sample_users(10, 4, loop.data.malicious, "sampled", 0, r).tolist() for r in range(1, 7)]
    assert received == expected == loop.participants
    present = [int(loop.data.malicious[ids].sum()) for ids in expected]
    assert 0 in present and max(present) >= 2  # the config meets a round with no attacker
    assert [h["attackers_present"] for h in loop.history] == present
    assert all(h["participants"] == 4 for h in loop.history)


def test_the_same_participants_in_every_arm_of_a_seed():
    config = cfg("training.rounds=3")
    runs = [run_arm(config, arm) for arm in ("benign", "attack", "krum")]
    expected = [sample_users(10, 4, make_loop(config, "benign").data.malicious, "sampled", 0, r).tolist()
                for r in (1, 2, 3)]
    assert all(r.detection["participants_per_round"] == expected for r in runs)


@pytest.mark.parametrize("defense", sorted(n for n, d in REGISTRY.items() if not d.pre_aggregator) + ["nnm+median"])
def test_every_defense_runs_under_sampling_and_judges_the_participants(defense):
    result = run_arm(cfg(), defense)
    assert math.isfinite(result.metrics["accuracy"])
    for key in ("detection_rate", "false_positive_rate"):
        value = result.metrics[key]
        assert value is None or 0 <= value <= 1
    if REGISTRY.get(defense) is not None and REGISTRY[defense].flags == "round":  # only the round's participants
        for out, ids in zip(result.detection["excluded_per_round"], result.detection["participants_per_round"]):
            assert set(out) <= set(ids)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_runs_under_sampling(attack):
    result = run_arm(cfg(f"attack.name={attack}"), "auror_guard")
    assert math.isfinite(result.metrics["accuracy"])


# 5 users (2 malicious), 2 per round: with seed 1, round 3's two users are both attackers
ONLY_ATTACKERS = [*TINY, "users.per_round=2", "seed=1", "training.rounds=3"]


@pytest.mark.parametrize("attack", ["alie", "ipm", "min_max", "auror_adaptive", "model_replacement"])
@pytest.mark.parametrize("defense", ["none", "krum", "bulyan", "auror", "foolsgold", "flame"])
def test_a_round_of_attackers_only(attack, defense):
    config = load_config(None, [*ONLY_ATTACKERS, f"attack.name={attack}"])
    loop = make_loop(config, defense)
    loop.run()
    assert loop.history[2]["attackers_present"] == 2 == loop.history[2]["participants"]
    assert all(math.isfinite(h["accuracy"]) for h in loop.history)


class StopAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_round_end(self, loop, round_, metrics):
        if round_ == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("arm, extra", [("auror_guard", ()), ("foolsgold", ()),
                                         ("none", ("server.optimizer=adam", "server.lr=0.05"))])
def test_a_resumed_sampled_run_continues_as_if_never_stopped(tmp_path, arm, extra):
    config = cfg(*extra)
    whole = make_loop(config, arm)
    whole.run()
    checkpoint = Checkpoint(tmp_path / f"{arm}.pt", "test")
    with pytest.raises(KeyboardInterrupt):
        make_loop(config, arm, [StopAt(3)], checkpoint).run()
    resumed = make_loop(config, arm, [StopAt(0)], checkpoint)
    resumed.run()
    assert torch.equal(parameters_to_vector(resumed.module.parameters()), parameters_to_vector(whole.module.parameters()))
    assert resumed.history == whole.history and resumed.participants == whole.participants


def test_detection_rates_count_the_users_a_defense_could_judge():
    malicious = torch.tensor([True, True, False, False, False])
    # round 1: users 0, 2, 3 take part, 0 left out; round 2: users 2, 4 (no attacker), 2 left out
    dr, fpr = defense_detection_rates("round", set(), [[0], [2]], malicious, [[0, 2, 3], [2, 4]])
    assert dr == 1.0 and fpr == pytest.approx((0 + 0.5) / 2)
    # flagged once: among the users seen at all (user 1 never took part)
    dr, fpr = defense_detection_rates("run", {0}, [], malicious, [[0, 2, 3], [2, 4]])
    assert dr == 1.0 and fpr == 0.0


def test_auror_judges_each_user_on_the_rounds_it_took_part_in():
    """A user's feature is the mean of its uploads over the window's rounds it took part in."""
    d = AurorDefense(AurorParams(alpha=0.5, window_rounds=2), None)
    g = torch.Generator().manual_seed(0)
    rounds = {1: [0, 1, 2, 3], 2: [0, 2, 4, 5]}
    for r, ids in rounds.items():
        updates = torch.randn(len(ids), 8, generator=g) * 0.01
        updates[[ids.index(0)], :] += 1.0  # user 0 stands apart in both rounds
        d.aggregate(Uploads(r, torch.tensor(ids), updates))
    assert d.flagged == {0}
    assert set(d.detections[0]["scores"]) == {"0", "1", "2", "3", "4", "5"}


def test_fedsgd_uploads_one_gradient_step_on_one_batch():
    config = load_config(None, [*TINY, "training.algorithm=fedsgd", "training.rounds=1", "attack.name=ipm"])
    loop = make_loop(config, "benign")
    start = parameters_to_vector(loop.module.parameters()).detach().clone()
    schedule = loop.schedule(loop.data.user_indices, loop.behaviour.epochs, 1)
    assert schedule.shape[0] == 1
    received = record_uploads(loop)
    loop.run()
    received = [u.updates for u in received]
    user = 2
    batch = schedule[0, user][schedule[0, user] >= 0]
    model = make_loop(config, "benign").module
    loss = model.loss(model(loop.data.train_x[batch]), loop.data.train_y[batch])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = -config.training.lr * torch.cat([g.flatten() for g in grads])
    assert torch.allclose(received[0][user], expected, atol=1e-6)
    assert torch.equal(start, parameters_to_vector(model.parameters()).detach())


def test_server_optimisers_follow_reddi_et_al():
    params, deltas = torch.zeros(3), [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, -1.0])]
    sgd = ServerConfig(lr=0.5)
    p, state = params, {}
    for d in deltas:
        p, state = server_step(sgd, p, d, state)
    assert torch.allclose(p, 0.5 * (deltas[0] + deltas[1]))
    # FedAvgM is torch's SGD with momentum on the pseudo-gradient -delta
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
    p, state = params, {}
    for d in deltas:
        p, state = server_step(ServerConfig("momentum", 0.5, 0.9), p, d, state)
        w.grad = -d
        opt.step()
    assert torch.allclose(p, w.detach())
    # FedAdam, by hand: m, v without bias correction, tau added to sqrt(v)
    cfg_adam = ServerConfig("adam", 0.1, 0.9, 0.99, 1e-3)
    p, state, m, v, expected = params, {}, 0, 0, params.clone()
    for d in deltas:
        p, state = server_step(cfg_adam, p, d, state)
        m, v = 0.9 * m + 0.1 * d, 0.99 * v + 0.01 * d**2
        expected = expected + 0.1 * m / (v.sqrt() + 1e-3)
    assert torch.allclose(p, expected)


def test_sgd_at_lr_1_is_the_global_model_plus_the_step_bit_for_bit():
    params, delta = torch.randn(100), torch.randn(100)
    assert torch.equal(server_step(ServerConfig(), params, delta, {})[0], params + delta)


def test_eval_every_skips_evaluations_not_training():
    every, each = run_arm(load_config(None, [*TINY, "training.eval_every=3"]), "auror"), run_arm(
        load_config(None, list(TINY)), "auror")
    assert [h["accuracy"] is None for h in every.history] == [False if r in (3, 4) else True for r in (1, 2, 3, 4)]
    assert every.metrics == each.metrics
    assert every.history[2]["accuracy"] == each.history[2]["accuracy"]


def test_sampling_with_dssgd_keeps_the_absent_users_local_parameters():
    result = run_arm(cfg("protocol.theta_d=0.5", "protocol.theta_u=0.5"), "auror")
    assert math.isfinite(result.metrics["accuracy"])


def test_every_round_participation_puts_the_attackers_share_in_each_round():
    loop = make_loop(cfg("attack.participation=every_round"), "auror_guard")
    loop.run()
    assert [h["attackers_present"] for h in loop.history] == [1.0] * 6  # round(4 x 3 / 10) = 1 of 4
