"""The collaborative rounds: download -> local training -> the attack's
craft -> upload -> the server's guard -> the defense's aggregate ->
evaluation -> callbacks.

The server side (the guard and the defense) only ever receives
:class:`~pipeline.core.server.Uploads`: user ids and update tensors, no data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.federated import FederatedDataModule
from pipeline.core.checkpoint import Checkpoint, CheckpointError
from pipeline.core.device import seeded_generator
from pipeline.core.faults import FAULT_STREAM, FaultsConfig, faulty_this_round, inject_faults, screen_uploads
from pipeline.core.local_training import train_users, user_batches
from pipeline.core.masking import (
    ProtocolConfig, add_laplace_noise, aggregate_per_coordinate, clip, download_merge, laplace_scale, mask_updates,
    num_kept, upload_mask,
)
from pipeline.core.metrics import accuracy
from pipeline.core.server import Aggregate, RoundUpdates, ServerInputs, Uploads, parameter_layout, present_rows

log = logging.getLogger("auror")


class ServerRule(Protocol):
    """What the loop asks of a defense (see :class:`pipeline.defenses.base.Defense`)."""

    def aggregate(self, uploads: Uploads) -> Aggregate: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ClientAttack(Protocol):
    """What the loop asks of an attack (see :class:`pipeline.attacks.base.Attack`)."""

    omniscient: bool

    def craft(self, updates: RoundUpdates) -> torch.Tensor: ...

    def success_rate(self, predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     predicted: torch.Tensor) -> float | None: ...


class Callback:
    """Round-level hooks of :class:`CollaborativeLoop`; override what you need."""

    def on_run_start(self, loop: "CollaborativeLoop") -> None: ...

    def on_round_end(self, loop: "CollaborativeLoop", round_: int, metrics: dict[str, float]) -> None: ...

    def on_run_end(self, loop: "CollaborativeLoop") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as if never stopped (tensors, lists, dicts, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# the protocol's random stream in a round, apart from every user's batch stream
PROTOCOL_STREAM = 2**32 - 1
# the server's root-set batches (FLTrust), apart from every user's batch stream
ROOT_STREAM = 2**32 - 3


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
    attackers: torch.Tensor  # bool (users,): the users whose uploads the attack crafts (none in the benign arm)
    pull: torch.Tensor | None = None  # (users,): weight of a pull towards the global model in the local loss


@dataclass
class CollaborativeLoop:
    module: torch.nn.Module
    data: FederatedDataModule
    behaviour: UserBehaviour
    rounds: int
    batch_size: int
    seed: int
    # the attack's update side (for behaviour.attackers) and its success metric (in every arm)
    attack: ClientAttack
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    callbacks: list[Callback] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    # builds the server's rule for the aggregate (a registered defense) from what the server holds;
    # None: the per-coordinate mean (no defense)
    make_defense: Callable[[ServerInputs], ServerRule] | None = None
    # per round, the ids of the users the defense gave no share of the step (of those who uploaded)
    excluded: list[list[int]] = field(default_factory=list)
    root_epochs: int = 1  # local epochs of the server on its root set (FLTrust)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    # saved at the end of every round; when it exists at the start, the run continues from it
    checkpoint: Checkpoint | None = None
    # where the model, the data and the server's tensors live (see select_device)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # recoveries: the rounds trained again, and the models they may go back to (round -> global, local)
    rounds_retrained: int = 0
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module.to(self.device)
        self.train_x, self.train_y, self.test_x, self.test_y = (
            t.to(self.device) for t in (self.data.train_x, self.data.train_y, self.data.test_x, self.data.test_y))
        self.server = ServerInputs(parameter_layout(self.module), self.seed, self.root_update)
        self.defense = self.make_defense(self.server) if self.make_defense is not None else None

    def root_update(self, round_: int) -> torch.Tensor:
        """The server's own update (FLTrust): ``root_epochs`` of local training on its
        clean root set (``data.root_indices``) from the current global model. Shape (P,)."""
        root = self.data.root_indices
        if len(root) == 0:
            raise RuntimeError("this defense needs a root set, but the data module holds none (data root_size=0)")
        schedule = user_batches([root], [self.root_epochs], self.batch_size, self.seed, round_, streams=[ROOT_STREAM])
        start = parameters_to_vector(self.module.parameters()).detach().unsqueeze(0)  # the global model
        trained = train_users(self.module, start.clone(), self.train_x, self.train_y, schedule,
                              torch.ones(1, device=self.device))
        return (trained - start)[0]

    def evaluate(self) -> dict[str, float | None]:
        """Accuracy on the test set and the attack's success (``None`` for an untargeted attack)."""
        self.module.eval()
        with torch.no_grad():
            def predict(x: torch.Tensor) -> torch.Tensor:
                return self.module(x).argmax(1)

            predicted = predict(self.test_x)
            success = self.attack.success_rate(predict, self.test_x, self.test_y, predicted)
        self.module.train()
        return {"accuracy": accuracy(predicted, self.test_y), "attack_success_rate": success}

    def craft(self, round_: int, updates: torch.Tensor) -> torch.Tensor:
        """The attackers' rows of ``updates`` replaced by what the attack uploads; it sees the
        honest rows only when it is omniscient."""
        attackers = self.behaviour.attackers.to(updates.device)
        honest = updates[~attackers] if self.attack.omniscient else None
        crafted = self.attack.craft(RoundUpdates(round_, updates[attackers], honest, len(attackers)))
        updates[attackers] = crafted.to(updates.dtype)  # the loop's own tensor, written in place
        return updates

    def run(self) -> dict[str, float]:
        """Run every round (from the checkpoint's next one when there is a
        checkpoint); return the final evaluation of the global model."""
        data, b, protocol, device = self.data, self.behaviour, self.protocol, self.device
        user_ids = torch.arange(len(data.user_indices), device=device)
        update_scale = b.update_scale.to(device).unsqueeze(1)
        global_params = parameters_to_vector(self.module.parameters()).detach().clone()
        # with theta_d < 1 users keep the parameters they did not download
        local_params = global_params.expand(len(user_ids), -1).clone()
        for cb in self.callbacks:
            cb.on_run_start(self)
        first = 1
        state = self.checkpoint.load() if self.checkpoint is not None else None
        if state is not None:
            global_params, local_params = self.load_state_dict(state, local_params)
            first = state["round"] + 1
            log.info("  resumed after round %d from %s", state["round"], self.checkpoint.path)
        quota = num_kept(protocol.theta_u, global_params.numel())
        depth = getattr(self.defense, "rewind_rounds", 0)  # how far back a recovery may send the global model
        round_ = first
        while round_ <= self.rounds:
            if depth:  # the models a recovery may go back to: after rounds round_ - depth .. round_ - 1
                self.snapshots[round_ - 1] = (global_params, local_params if protocol.theta_d < 1 else None)
                self.snapshots = {r: m for r, m in self.snapshots.items() if r >= round_ - depth}
            # client side: download, train locally, upload a masked update
            generator = seeded_generator(self.seed, round_, PROTOCOL_STREAM)
            start = download_merge(global_params, local_params, protocol.theta_d, generator)
            schedule = user_batches(data.user_indices, b.epochs, self.batch_size, self.seed, round_)
            local_params = train_users(self.module, start, self.train_x, self.train_y, schedule, b.lr_multipliers,
                                       b.pull)
            updates = (local_params - start) * update_scale
            if b.attackers.any():  # the attack's update side, before the protocol's upload
                updates = self.craft(round_, updates)
            sent = upload(updates, protocol, generator)
            if faulty_this_round(self.faults, round_):  # faulty clients, from the config's faults section
                sent = inject_faults(sent, self.faults, round_, seeded_generator(self.seed, round_, FAULT_STREAM))
            # server side: only the uploads from here on; the guard leaves out Inf and outlying updates
            screen = screen_uploads(sent, quota, self.faults.max_norm_ratio)
            uploads = Uploads(round_, user_ids, screen.updates)
            if self.defense is None:
                decision = Aggregate(aggregate_per_coordinate(uploads.updates, present_rows(uploads.updates)))
            else:
                decision = self.defense.aggregate(uploads)
            if decision.rewind_to is not None:
                global_params, local_params = self.rewind(round_, decision.rewind_to, global_params, local_params)
                round_ = decision.rewind_to + 1
                continue
            excluded = present_rows(uploads.updates) & (decision.excluded if decision.excluded is not None else False)
            self.excluded.append(user_ids[excluded].tolist())
            step = decision.step
            if not torch.isfinite(step).all():  # finite updates can still overflow float32 when summed
                log.warning("  round %d: the aggregate overflowed; non-finite coordinates left unchanged", round_)
                step = torch.where(torch.isfinite(step), step, 0)
            global_params = global_params + step
            vector_to_parameters(global_params.clone(), self.module.parameters())  # it would alias
            metrics = {**self.evaluate(), "excluded_users": float((excluded | screen.faulty).sum()),
                       "faulty_users": float(screen.faulty.sum()), "dropped_users": float(screen.dropped.sum()),
                       "incomplete_users": float(screen.incomplete.sum())}
            if screen.faulty.any() or screen.dropped.any() or screen.incomplete.any():
                log.warning("  round %d: left out users %s (Inf values) and %s (update norm > %g x median); "
                            "uploaded nothing: %s; uploaded only part: %s", round_,
                            *(user_ids[m].tolist() or "none" for m in (screen.infinite, screen.outlier)),
                            self.faults.max_norm_ratio,
                            *(user_ids[m].tolist() or "none" for m in (screen.dropped, screen.incomplete)))
            self.history.append({"round": round_, **metrics})
            for cb in self.callbacks:
                cb.on_round_end(self, round_, metrics)
            if self.checkpoint is not None:  # after the callbacks: a resumed run never skips their round
                self.checkpoint.save(self.state_dict(round_, global_params, local_params))
            round_ += 1
        for cb in self.callbacks:
            cb.on_run_end(self)
        return self.evaluate()

    def rewind(self, round_: int, back: int, global_params: torch.Tensor,
               local_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A recovery at ``round_``: the global (and local) parameters as they were after round ``back``, whose
        later rounds are forgotten (history, exclusions) and trained again; returns those parameters."""
        if back not in self.snapshots:
            raise RuntimeError(f"the defense asked to go back to round {back} at round {round_}, beyond the "
                               f"{len(self.snapshots)} rounds it declared (rewind_rounds)")
        saved_global, saved_local = self.snapshots[back]
        self.snapshots = {r: m for r, m in self.snapshots.items() if r <= back}
        global_params = saved_global.to(self.device)
        local_params = saved_local.to(self.device) if saved_local is not None else local_params
        vector_to_parameters(global_params.clone(), self.module.parameters())
        self.history[:] = [h for h in self.history if h["round"] <= back]
        del self.excluded[back:]
        self.rounds_retrained += round_ - back
        log.info("  round %d: recovery: back to the global model of round %d; rounds %d-%d trained again "
                 "without the flagged users", round_, back, back + 1, round_)
        if self.checkpoint is not None:
            self.checkpoint.save(self.state_dict(back, global_params, local_params))
        return global_params, local_params

    def state_dict(self, round_: int, global_params: torch.Tensor, local_params: torch.Tensor) -> dict[str, Any]:
        """Everything the rounds after ``round_`` depend on. Their random streams
        derive from (seed, round, user), so the round index stands for them; the
        torch global generator (only model initialisation uses it) is saved anyway."""
        return {
            "round": round_,
            "global_params": global_params,
            "module": self.module.state_dict(),  # the buffers, if the model has any
            # with theta_d = 1 every user starts each round from the global model
            "local_params": local_params if self.protocol.theta_d < 1 else None,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "excluded": self.excluded,
            "defense": self.defense.state_dict() if self.defense is not None else {},
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "snapshots": self.snapshots,
            "rounds_retrained": self.rounds_retrained,
        }

    def load_state_dict(self, state: dict[str, Any], local_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Restore a :meth:`state_dict`; returns the global and local parameters."""
        where = self.checkpoint.path if self.checkpoint is not None else "checkpoint"
        global_params = state["global_params"].to(self.device)  # checkpoints are loaded onto the CPU
        if global_params.shape != local_params.shape[1:] or len(state["callbacks"]) != len(self.callbacks):
            raise CheckpointError(f"{where}: saved by a run with another model or defense; delete it to restart "
                                  "that arm from round 1")
        self.module.load_state_dict(state["module"])
        vector_to_parameters(global_params.clone(), self.module.parameters())
        torch.set_rng_state(state["torch_rng"])
        self.history[:] = state["history"]
        self.excluded[:] = state["excluded"]
        if self.defense is not None:
            self.defense.load_state_dict(state["defense"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        self.snapshots = dict(state.get("snapshots", {}))  # absent from checkpoints of earlier versions
        self.rounds_retrained = state.get("rounds_retrained", 0)
        saved_local = state["local_params"]
        return global_params, saved_local.to(self.device) if saved_local is not None else local_params
