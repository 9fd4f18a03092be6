"""DBA and Neurotoxin: hand-worked triggers and masks, the attackers' data and uploads, the global step the
loop hands Neurotoxin (after the server's optimiser, across a recovery and a resume), and both attacks
working on the digits config."""

import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

from pipeline.attacks import REGISTRY
from pipeline.attacks.backdoor import stamp_pattern, trigger_value
from pipeline.attacks.dba import global_pattern, local_patterns, part_grid, trigger_extent
from pipeline.attacks.neurotoxin import Neurotoxin, NeurotoxinParams, masked_coordinates, neurotoxin_uploads
from pipeline.core.checkpoint import Checkpoint
from pipeline.core.local_training import train_users
from pipeline.core.loop import Callback, CollaborativeLoop
from pipeline.core.masking import aggregate_per_coordinate
from pipeline.core.server import Aggregate, RoundUpdates, parameter_layout, present_rows
from pipeline.experiment.arms import build_datamodule, build_model, make_attack, run_arm, user_behaviour
from pipeline.experiment.cli import main
from pipeline.experiment.config import ConfigError, load_config
from tests.conftest import TINY
from tests.test_resume import KILLER, runs_of

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")


def tiny(*overrides):
    return load_config(None, [*TINY, *overrides])


def grid(rows: list[str]) -> torch.Tensor:
    """A bool image from rows of '#' (True) and '.'."""
    return torch.tensor([[c == "#" for c in row] for row in rows])


# ---------------------------------------------------------------- DBA: the trigger's geometry


def test_dba_parts_tile_the_papers_two_by_two_pattern_on_digits():
    # parts 4, bars of 3, gap 1: a 2 x 2 grid; part k at row (k // 2) * (1 + 1), column (k % 2) * (3 + 1)
    parts = local_patterns(4, 3, 1, 8, 8)
    empty = ["........"] * 6
    assert torch.equal(parts[0], grid(["###.....", "........", "........", *empty[:5]]))
    assert torch.equal(parts[1], grid(["....###.", "........", "........", *empty[:5]]))
    assert torch.equal(parts[2], grid(["........", "........", "###.....", *empty[:5]]))
    assert torch.equal(parts[3], grid(["........", "........", "....###.", *empty[:5]]))
    assert torch.equal(global_pattern(4, 3, 1, 8, 8), grid(["###.###.", "........", "###.###.", *empty[:5]]))
    assert torch.equal(parts.any(0), global_pattern(4, 3, 1, 8, 8))  # the union of the parts
    assert parts.sum((1, 2)).tolist() == [3, 3, 3, 3] and parts.sum(0).max() == 1  # disjoint bars
    assert trigger_extent(4, 3, 1) == (3, 7)


def test_dba_geometry_is_the_papers_on_mnist_and_gtsrb():
    # the paper's MNIST trigger (size 4, gap 2): bars at rows 0 and 3, columns 0-3 and 6-9
    mnist = global_pattern(4, 4, 2, 28, 28)
    assert mnist.nonzero().tolist() == [[r, c] for r in (0, 3) for c in (*range(0, 4), *range(6, 10))]
    # its CIFAR trigger (size 6, gap 3) on 32 x 32 images: rows 0 and 4, columns 0-5 and 9-14
    cifar = global_pattern(4, 6, 3, 32, 32)
    assert cifar.nonzero().tolist() == [[r, c] for r in (0, 4) for c in (*range(0, 6), *range(9, 15))]
    # a grid of ceil(sqrt(parts)) columns, filled row by row: 5 parts -> 2 rows of 3 columns, 2 parts -> 1 x 2
    assert [part_grid(p) for p in (1, 2, 3, 4, 5, 9, 10)] == [(1, 1), (1, 2), (2, 2), (2, 2), (2, 3), (3, 3), (3, 4)]
    assert trigger_extent(5, 2, 1) == (3, 8)
    assert local_patterns(5, 2, 1, 10, 10)[4].nonzero().tolist() == [[2, 3], [2, 4]]  # row 1, column 1
    # stamped on 3-channel images (GTSRB), every channel takes its own value; flat 28 x 28 (MNIST) as one channel
    x = torch.rand(2, 3, 32, 32)
    value = torch.tensor([5.0, 6.0, 7.0])
    stamped = stamp_pattern(x, cifar, value)
    assert torch.equal(stamped[:, :, cifar], value.view(1, 3, 1).expand(2, 3, int(cifar.sum())))
    assert torch.equal(stamped[:, :, ~cifar], x[:, :, ~cifar]) and stamped.shape == x.shape
    flat = torch.rand(3, 784)
    stamped = stamp_pattern(flat, mnist, torch.tensor([9.0]))
    assert stamped.shape == (3, 784) and torch.equal(stamped.view(3, 28, 28)[:, mnist], torch.full((3, 16), 9.0))
    assert torch.equal(stamped.view(3, 28, 28)[:, ~mnist], flat.view(3, 28, 28)[:, ~mnist])


def test_a_dba_trigger_that_does_not_fit_is_refused_and_the_papers_fit():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["attack.name=dba", "attack.dba.bar_length=4"])
    assert str(err.value) == ("attack.dba.bar_length: 4 parts in 2 columns of 4-pixel bars, gap 1, make the global "
                              "trigger 9 pixels wide: must be smaller than digits's 8-pixel images, got 4")
    with pytest.raises(ConfigError, match=r"^attack.dba.bar_length: 9 parts in 3 columns .* 11 pixels wide"):
        load_config(None, ["attack.name=dba", "attack.dba.parts=9", "attack.dba.bar_length=3", "attack.dba.gap=1"])
    with pytest.raises(ConfigError, match=r"must be smaller than gtsrb's 32-pixel images, got 16"):
        load_config(None, ["data.name=gtsrb", "attack.name=dba", "attack.dba.bar_length=16"])
    for data, bar, gap in (("mnist", 4, 2), ("fashion_mnist", 4, 2), ("gtsrb", 6, 3), ("cifar10", 6, 3)):
        load_config(None, [f"data.name={data}", "attack.name=dba", f"attack.dba.bar_length={bar}",
                           f"attack.dba.gap={gap}"])
    # the image sides are the config's, shared with backdoor (which knew neither Fashion-MNIST nor CIFAR-10)
    for data in ("fashion_mnist", "cifar10"):
        load_config(None, [f"data.name={data}", "attack.name=backdoor", "attack.backdoor.trigger_size=20"])
    with pytest.raises(ConfigError, match=r"^attack.backdoor.trigger_size: must be smaller than cifar10's 32-pixel"):
        load_config(None, ["data.name=cifar10", "attack.name=backdoor", "attack.backdoor.trigger_size=32"])


@pytest.mark.parametrize("override, message", [
    ("attack.dba.parts=0", "attack.dba.parts: must be >= 1, got 0"),
    ("attack.dba.bar_length=0", "attack.dba.bar_length: must be >= 1, got 0"),
    ("attack.dba.gap=-1", "attack.dba.gap: must be >= 0, got -1"),
    ("attack.dba.poisoned_fraction=0", "attack.dba.poisoned_fraction: must be in (0, 1], got 0.0"),
    ("attack.neurotoxin.mask_ratio=1", "attack.neurotoxin.mask_ratio: must be in [0, 1) (1 would upload nothing), "
                                       "got 1.0"),
    ("attack.neurotoxin.mask_ratio=-0.1", "attack.neurotoxin.mask_ratio: must be in [0, 1) (1 would upload "
                                          "nothing), got -0.1"),
    ("attack.neurotoxin.trigger_size=0", "attack.neurotoxin.trigger_size: must be >= 1, got 0"),
    ("attack.neurotoxin.mask_ratio=nan", "attack.neurotoxin.mask_ratio: must be in [0, 1) (1 would upload "
                                         "nothing), got nan"),
])
def test_bad_parameters_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


# ---------------------------------------------------------------- DBA: the attackers' data and the success


def test_each_dba_attacker_stamps_only_its_own_part():
    # 6 attackers, 4 parts: attackers 0..5 (in id order) stamp parts 0, 1, 2, 3, 0, 1
    cfg = tiny("attack.name=dba", "users.num_users=14", "users.malicious_fraction=0.43")
    clean = build_datamodule(cfg, poison=False)
    data = build_datamodule(cfg, poison=True)
    value = trigger_value(clean.train_x)
    parts = local_patterns(4, 3, 1, 8, 8)
    attackers = data.malicious.nonzero().flatten().tolist()
    assert len(attackers) == 6
    for k, user in enumerate(attackers):
        rows = data.user_indices[user]
        mine = data.poisoned[rows]
        assert mine.sum() == round(0.5 * len(rows))  # poisoned_fraction of its samples
        images, before = data.train_x[rows][mine].view(-1, 8, 8), clean.train_x[rows][mine].view(-1, 8, 8)
        part = parts[k % 4]
        assert (images[:, part] == value).all()  # its part, at the brightest value
        assert torch.equal(images[:, ~part], before[:, ~part])  # nothing else: no other part
        assert (data.train_y[rows][mine] == cfg.attack.target_class).all()
        assert torch.equal(data.train_x[rows][~mine], clean.train_x[rows][~mine])
        assert torch.equal(data.train_y[rows][~mine], clean.train_y[rows][~mine])
    honest = torch.cat([data.user_indices[u] for u in range(14) if u not in attackers])
    assert not data.poisoned[honest].any()
    # the union of what the attackers stamped is the global trigger (every part used: 6 attackers >= 4 parts)
    stamped = torch.zeros(8, 8, dtype=torch.bool)
    for k in range(len(attackers)):
        stamped |= parts[k % 4]
    assert torch.equal(stamped, global_pattern(4, 3, 1, 8, 8))
    # the clean test set is untouched
    assert torch.equal(data.test_x, clean.test_x) and torch.equal(data.test_y, clean.test_y)


def test_the_dba_success_stamps_the_whole_global_trigger_on_a_copy_of_the_other_classes():
    cfg = tiny("attack.name=dba")
    data = build_datamodule(cfg, poison=False)
    attack = make_attack(cfg)
    attack.setup(data.train_x)
    trigger = global_pattern(4, 3, 1, 8, 8)
    seen = []

    def triggered_only(x):  # the target exactly when the whole global trigger is there, else class 0
        seen.append(x)
        return torch.where((x.view(-1, 8, 8)[:, trigger] == attack.value).all(1), 7, 0)

    before = data.test_x.clone()
    assert attack.success_rate(triggered_only, data.test_x, data.test_y, None) == 1.0
    (x,) = seen
    assert len(x) == int((data.test_y != 7).sum())  # the non-target inputs only
    assert torch.equal(data.test_x, before)  # stamped on a copy
    assert torch.equal(x.view(-1, 8, 8)[:, ~trigger], before[data.test_y != 7].view(-1, 8, 8)[:, ~trigger])
    # a success stamping one part only would score 0 above; one stamping beyond the trigger would score here
    r, c = (~trigger).nonzero()[0].tolist()
    assert attack.success_rate(lambda x: torch.where(x.view(-1, 8, 8)[:, r, c] == attack.value, 7, 0),
                               data.test_x, data.test_y, None) < 0.5
    assert attack.success_definition() == "backdoor -> 7, dba 4 x 3 gap 1"


def test_dba_runs_on_the_tiny_config_and_beats_the_benign_arm_on_digits():
    assert run_arm(tiny("attack.name=dba"), "attack").metrics["attack_success_rate"] is not None
    cfg = load_config(DIGITS, ["attack.name=dba", "training.rounds=10", "training.device=cpu"])
    benign, attacked = run_arm(cfg, "benign").metrics, run_arm(cfg, "attack").metrics
    # measured: benign 0.138 (the global trigger's own pull on a clean model), attack 1.000
    assert attacked["attack_success_rate"] - benign["attack_success_rate"] >= 0.5, (attacked, benign)
    assert attacked["accuracy"] > benign["accuracy"] - 0.05  # a backdoor: clean accuracy stays


# ---------------------------------------------------------------- Neurotoxin: the mask and the upload


def test_the_mask_is_the_top_mask_ratio_of_the_last_steps_magnitudes():
    step = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 0.0, 1.0, -1.5, 0.05, 0.3])
    # 0.3 x 10 = 3 coordinates: |s| = 3 (index 1), 2 (index 3), 1.5 (index 7); the next, 1 (index 6), is kept
    assert masked_coordinates(step, 0.3).nonzero().flatten().tolist() == [1, 3, 7]
    assert masked_coordinates(step, 0.1).nonzero().flatten().tolist() == [1]
    assert not masked_coordinates(step, 0.0).any()
    # ties: the lower index first (|1| = |-1| = |1|: indices 0 and 1 of 0, 1, 2)
    assert masked_coordinates(torch.tensor([1.0, -1.0, 1.0, 0.5]), 0.5).nonzero().flatten().tolist() == [0, 1]
    big = torch.randn(6566, generator=torch.Generator().manual_seed(0))
    masked = masked_coordinates(big, 0.05)
    assert masked.sum() == round(0.05 * 6566) == 328
    assert big.abs()[masked].min() >= big.abs()[~masked].max()


def test_the_upload_is_zero_on_the_masked_coordinates_and_the_attackers_own_elsewhere():
    step = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 0.0, 1.0, -1.5, 0.05, 0.3])
    own = torch.randn(2, 10, generator=torch.Generator().manual_seed(1)) - 5  # no zero: a zero would be ambiguous
    attack = Neurotoxin(NeurotoxinParams(mask_ratio=0.3), load_config(None, []).attack)
    crafted = attack.craft(RoundUpdates(3, own, None, 5, last_step=step))
    masked = torch.zeros(10, dtype=torch.bool)
    masked[[1, 3, 7]] = True
    assert (crafted[:, masked] == 0).all() and not torch.signbit(crafted[:, masked]).any()  # +0, not -0
    assert torch.equal(crafted[:, ~masked], own[:, ~masked])
    # round 1: no last step, the attacker uploads its own update unmasked (the plain BadNets round)
    assert torch.equal(attack.craft(RoundUpdates(1, own, None, 5)), own)
    assert torch.equal(neurotoxin_uploads(own, step, 0.0), own)
    assert Neurotoxin.needs_last_step and not REGISTRY["backdoor"].needs_last_step


def test_projecting_the_upload_is_projecting_the_step_for_one_local_step_only():
    """The choice of projecting the upload, not every SGD step: for one step they are the same update; for two
    they differ on the kept coordinates (second order), and both are zero on the masked ones."""
    cfg = tiny("attack.name=neurotoxin")
    data = build_datamodule(cfg, poison=True)
    torch.manual_seed(0)
    module = build_model(cfg, data)
    start = parameters_to_vector(module.parameters()).detach().clone()
    layout = parameter_layout(module)
    step = torch.randn(start.numel(), generator=torch.Generator().manual_seed(2))
    keep = ~masked_coordinates(step, 0.3)
    batches = data.user_indices[int(data.malicious.nonzero()[0])][:64].view(2, 1, 32)  # 2 steps, 1 user, 32

    def pgd(steps):  # masked SGD, written out: theta -= lr * (keep * grad) at every step
        theta = start.clone()
        for b in batches[:steps, 0]:
            leaf = theta.clone().requires_grad_(True)
            params = {s.name: leaf[s.start:s.stop].view(s.shape) for s in layout}
            loss = module.loss(functional_call(module, params, (data.train_x[b],)), data.train_y[b])
            (grad,) = torch.autograd.grad(loss, leaf)
            theta = theta - module.hparams.lr * keep * grad
        return theta - start

    for steps in (1, 2):
        trained = train_users(module, start, data.train_x, data.train_y, batches[:steps], torch.ones(1))
        projected = neurotoxin_uploads(trained - start, step, 0.3)[0]
        assert (projected[~keep] == 0).all() and (pgd(steps)[~keep] == 0).all()
        if steps == 1:
            torch.testing.assert_close(projected, pgd(1), rtol=1e-5, atol=1e-7)
        else:
            assert (projected - pgd(2)).abs().max() > 1e-6  # the path differs after the first step


# ---------------------------------------------------------------- the loop's last step


class Spy:
    """Records every RoundUpdates an attack class's craft receives."""

    def __init__(self, monkeypatch, cls):
        self.seen = []
        original = cls.craft

        def craft(attack, updates):
            self.seen.append(updates)
            return original(attack, updates)

        monkeypatch.setattr(cls, "craft", craft)


class GlobalModels(Callback):
    """The global parameters at the end of every round."""

    def __init__(self):
        self.after = []

    def on_round_end(self, loop, round_, metrics):
        self.after.append(parameters_to_vector(loop.module.parameters()).detach().clone())


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_the_last_step_is_what_the_global_model_moved_by(monkeypatch, optimizer):
    spy = Spy(monkeypatch, Neurotoxin)
    models = GlobalModels()
    cfg = tiny("attack.name=neurotoxin", f"server.optimizer={optimizer}", "server.lr=0.5")
    torch.manual_seed(cfg.seed)
    initial = parameters_to_vector(build_model(cfg, build_datamodule(cfg, poison=False)).parameters()).detach()
    run_arm(cfg, "attack", callbacks=[models])
    assert [u.round for u in spy.seen] == [1, 2, 3, 4]
    assert spy.seen[0].last_step is None
    moved = [models.after[0] - initial] + [b - a for a, b in zip(models.after, models.after[1:])]
    for updates, step in zip(spy.seen[1:], moved):
        assert torch.equal(updates.last_step, step)  # after the server's optimiser: not the aggregate


def test_an_attack_that_does_not_ask_gets_no_last_step_and_checkpoints_none(monkeypatch, tmp_path):
    spy = Spy(monkeypatch, REGISTRY["backdoor"])
    checkpoint = Checkpoint(tmp_path / "backdoor.pt", "test")

    class Keep(Callback):
        def on_round_end(self, loop, round_, metrics):
            if round_ == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_arm(tiny("attack.name=backdoor"), "attack", callbacks=[Keep()], checkpoint=checkpoint)
    assert [u.last_step for u in spy.seen] == [None, None]
    assert "last_step" not in checkpoint.load()
    neuro = Checkpoint(tmp_path / "neurotoxin.pt", "test")
    with pytest.raises(KeyboardInterrupt):
        run_arm(tiny("attack.name=neurotoxin"), "attack", callbacks=[Keep()], checkpoint=neuro)
    assert neuro.load()["last_step"].shape == spy.seen[0].own.shape[1:]


class RewindOnce:
    """The per-coordinate mean, but at round 3 (once) a recovery back to the model after round 1."""

    rewind_rounds = 2

    def __init__(self):
        self.done = False

    def aggregate(self, uploads):
        accepted = present_rows(uploads.updates)
        rewind = None
        if uploads.round == 3 and not self.done:
            self.done, rewind = True, 1
        return Aggregate(aggregate_per_coordinate(uploads.updates, accepted), rewind_to=rewind)

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = state["done"]


def neurotoxin_loop(cfg, checkpoint=None, callbacks=()):
    """The neurotoxin attack arm of ``cfg`` with :class:`RewindOnce` on the server."""
    data = build_datamodule(cfg, poison=True)
    attack = make_attack(cfg)
    attack.setup(data.train_x)
    torch.manual_seed(cfg.seed)
    return CollaborativeLoop(build_model(cfg, data), data, user_behaviour(cfg, attack, data.malicious, True),
                             cfg.training.rounds, cfg.training.batch_size, cfg.seed, attack, cfg.protocol,
                             make_defense=lambda server: RewindOnce(), checkpoint=checkpoint, callbacks=list(callbacks))


def test_after_a_recovery_the_last_step_is_the_step_into_the_model_it_went_back_to(monkeypatch):
    spy = Spy(monkeypatch, Neurotoxin)
    models = GlobalModels()
    loop = neurotoxin_loop(tiny("attack.name=neurotoxin"), callbacks=[models])
    loop.run()
    # rounds 1, 2, 3 (discarded: back to the model after round 1), then 2, 3, 4 trained again
    assert [u.round for u in spy.seen] == [1, 2, 3, 2, 3, 4] and loop.rounds_retrained == 2
    assert spy.seen[0].last_step is None
    assert torch.equal(spy.seen[3].last_step, spy.seen[1].last_step)  # round 1's step, not round 2's
    assert not torch.equal(spy.seen[3].last_step, spy.seen[2].last_step)
    # the rounds ended: 1, 2 (forgotten by the recovery), 2, 3, 4; the last step of 3 and 4 is what they moved by
    after = models.after
    assert torch.equal(spy.seen[4].last_step, after[2] - after[0]) and torch.equal(spy.seen[5].last_step,
                                                                                    after[3] - after[2])


class StopAt(Callback):
    """Ctrl-C at the end of the ``n``-th round the loop finishes (rounds trained again count again)."""

    def __init__(self, n):
        self.n, self.ended = n, 0

    def on_round_end(self, loop, round_, metrics):
        self.ended += 1
        if self.ended == self.n:
            raise KeyboardInterrupt


def final_params(loop):
    return parameters_to_vector(loop.module.parameters()).detach()


# the rounds end 1, 2, (3: a recovery back to 1), 2, 3, 4, 5; stopped at the n-th end, the checkpoint holds the
# round before it (the callbacks run before the save): 1; 1 as the recovery saved it; 2 and 3 trained again
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_a_resumed_neurotoxin_run_equals_an_uninterrupted_one(tmp_path, n):
    cfg = tiny("attack.name=neurotoxin", "training.rounds=5")
    whole = neurotoxin_loop(cfg, callbacks=[StopAt(0)])
    whole.run()
    assert whole.rounds_retrained == 2
    checkpoint = Checkpoint(tmp_path / "seed0-attack.pt", "neurotoxin|test")
    with pytest.raises(KeyboardInterrupt):
        neurotoxin_loop(cfg, checkpoint, [StopAt(n)]).run()
    interrupted = checkpoint.load()
    assert interrupted["last_step"] is not None
    resumed = neurotoxin_loop(cfg, checkpoint, [StopAt(0)])
    resumed.run()
    assert torch.equal(final_params(resumed), final_params(whole))
    assert resumed.history == whole.history and resumed.rounds_retrained == whole.rounds_retrained
    # without the saved step the resumed round would craft as round 1 does: another model
    del interrupted["last_step"]
    dropped = Checkpoint(tmp_path / "dropped.pt", "neurotoxin|test")
    dropped.save(interrupted)
    without = neurotoxin_loop(cfg, dropped, [StopAt(0)])
    without.run()
    assert not torch.equal(final_params(without), final_params(whole))


ARGS = [a for s in [*TINY, "attack.name=neurotoxin"] for a in ("--set", s)]


@pytest.mark.slow
def test_auror_run_of_neurotoxin_sigkilled_then_resumed_reports_the_uninterrupted_metrics(tmp_path, monkeypatch):
    """As tests/test_resume.py, for neurotoxin's arms: killed at a random local-training call, resumed by id."""
    whole = tmp_path / "whole"
    whole.mkdir()
    monkeypatch.chdir(whole)
    assert main(["run", *ARGS]) == 0
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    n = random.randint(2, 12)  # of 3 arms x 4 rounds
    killed = subprocess.run([sys.executable, "-c", KILLER, "SIGKILL", str(n), *ARGS], cwd=killed_dir,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert re.search(r"auror run --resume \d{8}-\d{6}-[0-9a-f]+\)", killed.stdout), killed.stdout
    (running,) = [r for r in runs_of(killed_dir) if r.info.status == "RUNNING"]
    monkeypatch.chdir(killed_dir)
    assert main(["run", "--resume", running.info.run_id]) == 0, f"killed at local training call {n}"
    for name in ("latest.json", "rounds.csv"):
        assert (killed_dir / "reports" / name).read_text() == (whole / "reports" / name).read_text(), n
    assert json.loads((whole / "reports/latest.json").read_text())["attack"]["attack_success_rate"] is not None


# ---------------------------------------------------------------- Neurotoxin on digits


def test_neurotoxin_beats_the_benign_arm_on_digits():
    assert run_arm(tiny("attack.name=neurotoxin"), "attack").metrics["attack_success_rate"] is not None
    cfg = load_config(DIGITS, ["attack.name=neurotoxin", "training.rounds=10", "training.device=cpu"])
    benign, attacked = run_arm(cfg, "benign").metrics, run_arm(cfg, "attack").metrics
    # measured: benign 0.000, attack 1.000 (mask_ratio 0.05; 0.5 gives 1.000 too)
    assert attacked["attack_success_rate"] - benign["attack_success_rate"] >= 0.5, (attacked, benign)
