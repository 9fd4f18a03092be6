"""The collaborative rounds: download -> local training -> upload -> callbacks
(defenses) -> aggregation -> evaluation.

The server side (callbacks' :meth:`Callback.reject` and :func:`aggregate_mean`)
only ever receives :class:`Uploads`: user ids and update tensors, no data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.federated import FederatedDataModule
from pipeline.local_training import train_users, user_batches
from pipeline.metrics import accuracy, attack_success_rate


@dataclass(frozen=True)
class Uploads:
    """What the server receives in one round."""

    round: int
    user_ids: torch.Tensor  # (users,)
    updates: torch.Tensor  # (users, parameters): local parameters minus the global ones


class Callback:
    """Round-level hooks of :class:`CollaborativeLoop`; override what you need."""

    def on_run_start(self, loop: "CollaborativeLoop") -> None: ...

    def reject(self, uploads: Uploads) -> set[int]:
        """Server side: ids of users whose updates this round must not be aggregated."""
        return set()

    def on_round_end(self, loop: "CollaborativeLoop", round_: int, metrics: dict[str, float]) -> None: ...

    def on_run_end(self, loop: "CollaborativeLoop") -> None: ...


def aggregate_mean(updates: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """Mean of the accepted users' updates; no change when nobody is accepted."""
    if not accepted.any():
        return torch.zeros(updates.shape[1], dtype=updates.dtype)
    return updates[accepted].mean(0)


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
        data, b = self.data, self.behaviour
        user_ids = torch.arange(len(data.user_indices))
        global_params = parameters_to_vector(self.module.parameters()).detach().clone()
        for cb in self.callbacks:
            cb.on_run_start(self)
        for round_ in range(1, self.rounds + 1):
            # client side: every user downloads the global model and trains locally
            schedule = user_batches(data.user_indices, b.epochs, self.batch_size, self.seed, round_)
            local = train_users(self.module, global_params, data.train_x, data.train_y, schedule, b.lr_multipliers)
            uploads = Uploads(round_, user_ids, (local - global_params) * b.update_scale.unsqueeze(1))
            # server side: only the uploads from here on
            rejected = set().union(*(cb.reject(uploads) for cb in self.callbacks))
            accepted = ~torch.isin(user_ids, torch.tensor(sorted(rejected), dtype=torch.long))
            global_params = global_params + aggregate_mean(uploads.updates, accepted)
            vector_to_parameters(global_params.clone(), self.module.parameters())  # it would alias
            metrics = {**self.evaluate(), "excluded_users": float((~accepted).sum())}
            self.history.append({"round": round_, **metrics})
            for cb in self.callbacks:
                cb.on_round_end(self, round_, metrics)
        for cb in self.callbacks:
            cb.on_run_end(self)
        return self.evaluate()
