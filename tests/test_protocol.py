"""The collaborative loop under Shokri & Shmatikov's protocol (DSSGD)."""

import torch
from torch.nn.utils import parameters_to_vector

from pipeline.experiment.config import load_config
from pipeline.experiment.arms import build_datamodule, make_attack, run_arm, user_behaviour
from lightning_modules.mlp import MLPClassifier
from pipeline.core.local_training import train_users, user_batches
from pipeline.core.loop import CollaborativeLoop
from pipeline.defenses import REGISTRY
from pipeline.defenses.auror import AurorDefense
from tests.conftest import TINY


class RecordingAuror(AurorDefense):
    """AUROR that keeps a copy of every round's uploads (what the server saw)."""

    seen: list[torch.Tensor] = []

    def aggregate(self, uploads):
        RecordingAuror.seen.append(uploads.updates.clone())
        return super().aggregate(uploads)


def test_default_protocol_is_plain_federated_averaging_bit_for_bit():
    cfg = load_config(None, TINY)
    data = build_datamodule(cfg, poison=True)
    torch.manual_seed(0)
    module = MLPClassifier(64, 10, cfg.training.hidden_sizes, cfg.training.lr)
    behaviour = user_behaviour(cfg, make_attack(cfg), data.malicious, attacking=True)
    start = parameters_to_vector(module.parameters()).detach().clone()

    # FedAvg written out: everyone trains from the global model, the server adds the mean update
    expected = start.clone()
    for round_ in range(1, cfg.training.rounds + 1):
        schedule = user_batches(data.user_indices, behaviour.epochs, cfg.training.batch_size, cfg.seed, round_)
        local = train_users(module, expected, data.train_x, data.train_y, schedule, behaviour.lr_multipliers)
        expected = expected + ((local - expected) * behaviour.update_scale.unsqueeze(1)).mean(0)

    loop = CollaborativeLoop(module, data, behaviour, cfg.training.rounds, cfg.training.batch_size, cfg.seed,
                             make_attack(cfg), cfg.protocol)
    loop.run()
    assert torch.equal(parameters_to_vector(module.parameters()), expected)


def test_dssgd_uploads_exactly_theta_u_and_auror_clusters_the_masked_features(monkeypatch):
    cfg = load_config(None, [*TINY, "protocol.theta_u=0.1", "protocol.theta_d=0.5", "protocol.gamma=0.05",
                             "protocol.epsilon=1000"])
    monkeypatch.setitem(REGISTRY, "auror", RecordingAuror)
    monkeypatch.setattr(RecordingAuror, "seen", [])
    result = run_arm(cfg, "auror")
    num_params = RecordingAuror.seen[0].shape[1]
    assert len(RecordingAuror.seen) == cfg.training.rounds
    for updates in RecordingAuror.seen:
        uploaded = ~torch.isnan(updates)
        assert (uploaded.sum(1) == round(0.1 * num_params)).all()
        # clipped to gamma, then noised with scale 2 * gamma * c / epsilon
        assert updates[uploaded].abs().max() < 0.05 + 40 * (2 * 0.05 * round(0.1 * num_params) / 1000)
    assert result.detection["num_features"] == num_params
    assert torch.isfinite(parameters_to_vector(result.module.parameters())).all()
