"""The collaborative rounds: download -> local training -> upload -> callbacks
(defenses) -> aggregation -> evaluation.

The server side (callbacks' :meth:`Callback.reject` and the aggregation)
only ever receives :class:`Uploads`: user ids and update tensors, no data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.federated import FederatedDataModule
from pipeline.config import ProtocolConfig
from pipeline.local_training import train_users, user_batches
from pipeline.masking import (
    add_laplace_noise, aggregate_per_coordinate, clip, download_merge, laplace_scale, mask_updates, num_kept,
    upload_mask,
)
from pipeline.metrics import accuracy, attack_success_rate


@dataclass(frozen=True)
class Uploads:
    """What the server receives in one round."""

    round: int
    user_ids: torch.Tensor  # (users,)
    updates: torch.Tensor  # (users, parameters): change of the local parameters; NaN where not uploaded


class Callback:
    """Round-level hooks of :class:`CollaborativeLoop`; override what you need."""

    def on_run_start(self, loop: "CollaborativeLoop") -> None: ...

    def reject(self, uploads: Uploads) -> set[int]:
        """Server side: ids of users whose updates this round must not be aggregated."""
        return set()

    def on_round_end(self, loop: "CollaborativeLoop", round_: int, metrics: dict[str, float]) -> None: ...

    def on_run_end(self, loop: "CollaborativeLoop") -> None: ...


# the protocol's random stream in a round, apart from every user's batch stream
PROTOCOL_STREAM = 2**32 - 1


def seeded_generator(*keys: int) -> torch.Generator:
    state = np.random.SeedSequence(keys).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def upload(updates: torch.Tensor, protocol: ProtocolConfig, generator: torch.Generator) -> torch.Tensor:
    """Client side of DSSGD: keep a fraction theta_u of each user's update,
    clip it to [-gamma, gamma], add Laplace noise for the budget epsilon.
    Returns the server's view: NaN where a user uploaded nothing."""
    mask = upload_mask(updates, protocol.theta_u, protocol.upload_selection, generator)
    scale = laplace_scale(protocol.gamma, protocol.epsilon, num_kept(protocol.theta_u, updates.shape[1]))
    return mask_updates(add_laplace_noise(clip(updates, protocol.gamma), scale, generator), mask)


@dataclass
class UserBehaviour:
    """Per-user local training settings; the attacker sets its own users'."""

    epochs: list[int]
    lr_multipliers: torch.Tensor  # (users,)
    update_scale: torch.Tensor  # (users,): the boost applied to the update before upload


@dataclass
class CollaborativeLoop:
    module: torch.nn.Module
    data: FederatedDataModule
    behaviour: UserBehaviour
    rounds: int
    batch_size: int
    seed: int
    source_class: int
    target_class: int
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    callbacks: list[Callback] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    def evaluate(self) -> dict[str, float]:
        self.module.eval()
        with torch.no_grad():
            predicted = self.module(self.data.test_x).argmax(1)
        self.module.train()
        return {
            "accuracy": accuracy(predicted, self.data.test_y),
            "attack_success_rate": attack_success_rate(
                predicted, self.data.test_y, self.source_class, self.target_class
            ),
        }

    def run(self) -> dict[str, float]:
        """Run every round; return the final evaluation of the global model."""
        data, b, protocol = self.data, self.behaviour, self.protocol
        user_ids = torch.arange(len(data.user_indices))
        global_params = parameters_to_vector(self.module.parameters()).detach().clone()
        # with theta_d < 1 users keep the parameters they did not download
        local_params = global_params.expand(len(user_ids), -1).clone()
        for cb in self.callbacks:
            cb.on_run_start(self)
        for round_ in range(1, self.rounds + 1):
            # client side: download, train locally, upload a masked update
            generator = seeded_generator(self.seed, round_, PROTOCOL_STREAM)
            start = download_merge(global_params, local_params, protocol.theta_d, generator)
            schedule = user_batches(data.user_indices, b.epochs, self.batch_size, self.seed, round_)
            local_params = train_users(self.module, start, data.train_x, data.train_y, schedule, b.lr_multipliers)
            updates = (local_params - start) * b.update_scale.unsqueeze(1)
            uploads = Uploads(round_, user_ids, upload(updates, protocol, generator))
            # server side: only the uploads from here on
            rejected = set().union(*(cb.reject(uploads) for cb in self.callbacks))
            accepted = ~torch.isin(user_ids, torch.tensor(sorted(rejected), dtype=torch.long))
            global_params = global_params + aggregate_per_coordinate(uploads.updates, accepted)
            vector_to_parameters(global_params.clone(), self.module.parameters())  # it would alias
            metrics = {**self.evaluate(), "excluded_users": float((~accepted).sum())}
            self.history.append({"round": round_, **metrics})
            for cb in self.callbacks:
                cb.on_round_end(self, round_, metrics)
        for cb in self.callbacks:
            cb.on_run_end(self)
        return self.evaluate()
