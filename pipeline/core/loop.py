"""The collaborative rounds: download -> local training -> the attack's
craft -> upload -> the server's guard -> the defense's aggregate ->
evaluation -> callbacks.

The server side (the guard and the defense) only ever receives
:class:`~pipeline.core.server.Uploads`: user ids and update tensors, no data.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.federated import FederatedDataModule
from pipeline.core.checkpoint import Checkpoint, CheckpointError
from pipeline.core.device import keep_freed_memory, seeded_generator
from pipeline.core.faults import FAULT_STREAM, FaultsConfig, faulty_this_round, inject_faults, screen_uploads
from pipeline.core.local_training import moved_probabilities, train_users, user_batches
from pipeline.core.masking import (
    ProtocolConfig, add_laplace_noise, aggregate_per_coordinate, clip, download_merge, laplace_scale, mask_updates,
    num_kept, upload_mask,
)
from pipeline.core.metrics import accuracy
from pipeline.core.sampling import sample_users
from pipeline.core.server_optimizer import ServerConfig, server_step
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
    needs_last_step: bool  # craft receives the previous round's global step

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
    if protocol.theta_u == 1 and math.isinf(protocol.gamma) and math.isinf(protocol.epsilon):
        return updates  # plain federated averaging: every step below is the identity
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
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor | None, dict]] = field(default_factory=dict)
    # the users of a round (pipeline.core.sampling): a count (None: everyone) and how the attackers take part
    per_round: int | None = None
    participation: str = "sampled"
    participants: list[list[int]] = field(default_factory=list)  # per round, under sampling
    algorithm: str = "fedavg"  # fedavg | fedsgd: one step on one batch per user and round
    server_optimizer: ServerConfig = field(default_factory=ServerConfig)
    eval_every: int = 1  # evaluate every N rounds and the last
    # what the global model moved by in the last round (None before round 1's step); kept, checkpointed and
    # passed to craft only for an attack with needs_last_step
    last_step: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.module.to(self.device)
        self.train_x, self.train_y, self.test_x, self.test_y = (
            t.to(self.device) for t in (self.data.train_x, self.data.train_y, self.data.test_x, self.data.test_y))
        self.server = ServerInputs(parameter_layout(self.module), self.seed, self.root_update, self.model_outputs,
                                   tuple(self.train_x.shape[1:]))
        self.defense = self.make_defense(self.server) if self.make_defense is not None else None

    def root_update(self, round_: int) -> torch.Tensor:
        """The server's own update (FLTrust): ``root_epochs`` of local training on its
        clean root set (``data.root_indices``) from the current global model. Shape (P,)."""
        root = self.data.root_indices
        if len(root) == 0:
            raise RuntimeError("this defense needs a root set, but the data module holds none (data root_size=0)")
        schedule = self.schedule([root], [self.root_epochs], round_, [ROOT_STREAM])
        start = parameters_to_vector(self.module.parameters()).detach().unsqueeze(0)  # the global model
        trained = train_users(self.module, start.clone(), self.train_x, self.train_y, schedule,
                              torch.ones(1, device=self.device))
        return (trained - start)[0]

    def model_outputs(self, updates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The class probabilities (rows, N, classes) of the global model moved by each row of ``updates``
        (rows, P) on the inputs ``x`` (N, ...) (DeepSight's probes)."""
        start = parameters_to_vector(self.module.parameters()).detach()
        return moved_probabilities(self.module, start, updates, x.to(self.device))

    def schedule(self, indices: list[torch.Tensor], epochs: list[int], round_: int,
                 streams: list[int] | None = None) -> torch.Tensor:
        """The round's mini-batches (:func:`user_batches`); under FedSGD the first batch of each user only."""
        if self.algorithm == "fedsgd":
            return user_batches(indices, [1] * len(indices), self.batch_size, self.seed, round_, streams)[:1]
        return user_batches(indices, epochs, self.batch_size, self.seed, round_, streams)

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

    def craft(self, round_: int, updates: torch.Tensor, attackers: torch.Tensor) -> torch.Tensor:
        """The ``attackers`` rows (bool (rows,)) of ``updates`` replaced by what the attack uploads; it sees the
        honest rows only when it is omniscient (in a round with no honest user, its own rows: what ALIE's
        attacker estimates from when it is not omniscient)."""
        attackers = attackers.to(updates.device)
        honest = None
        if self.attack.omniscient:
            honest = updates[~attackers] if not attackers.all() else updates[attackers].clone()
        crafted = self.attack.craft(RoundUpdates(round_, updates[attackers], honest, len(attackers), self.seed,
                                                 self.last_step))
        updates[attackers] = crafted.to(updates.dtype)  # the loop's own tensor, written in place
        return updates

    def run(self) -> dict[str, float]:
        """Run every round (from the checkpoint's next one when there is a
        checkpoint); return the final evaluation of the global model."""
        data, b, protocol, device = self.data, self.behaviour, self.protocol, self.device
        keep_freed_memory()  # a round's (users, P) tensors reuse the heap's pages (see there)
        num_users = len(data.user_indices)
        update_scale = b.update_scale.to(device).unsqueeze(1)
        global_params = parameters_to_vector(self.module.parameters()).detach().clone()
        # with theta_d < 1 users keep the parameters they did not download (every user's: memory num_users x P)
        local_params = global_params.expand(num_users, -1).clone() if protocol.theta_d < 1 else None
        optimizer_state: dict = {}  # the server optimiser's (momentum, adam)
        for cb in self.callbacks:
            cb.on_run_start(self)
        first = 1
        state = self.checkpoint.load() if self.checkpoint is not None else None
        if state is not None:
            global_params, local_params, optimizer_state = self.load_state_dict(state, global_params, local_params)
            first = state["round"] + 1
            log.info("  resumed after round %d from %s", state["round"], self.checkpoint.path)
        quota = num_kept(protocol.theta_u, global_params.numel())
        depth = getattr(self.defense, "rewind_rounds", 0)  # how far back a recovery may send the global model
        keep_step = self.attack.needs_last_step
        round_ = first
        while round_ <= self.rounds:
            if depth:  # the models a recovery may go back to: after rounds round_ - depth .. round_ - 1
                self.snapshots[round_ - 1] = (global_params, local_params, optimizer_state,
                                              *((self.last_step,) if keep_step else ()))
                self.snapshots = {r: m for r, m in self.snapshots.items() if r >= round_ - depth}
            # who takes part: everyone, or the round's sample (the same in every arm of the seed)
            ids = sample_users(num_users, self.per_round or num_users, data.malicious, self.participation, self.seed,
                               round_)
            everyone = len(ids) == num_users
            user_ids = ids.to(device)
            # client side: download, train locally, upload a masked update
            generator = seeded_generator(self.seed, round_, PROTOCOL_STREAM)
            if local_params is None:  # everyone starts from the global model (train_users copies it per user)
                start = global_params
            else:
                start = download_merge(global_params, local_params if everyone else local_params[user_ids],
                                       protocol.theta_d, generator)
            if everyone:
                schedule = self.schedule(data.user_indices, b.epochs, round_)
            else:
                chosen = ids.tolist()
                schedule = self.schedule([data.user_indices[u] for u in chosen], [b.epochs[u] for u in chosen],
                                         round_, chosen)
            trained = train_users(self.module, start, self.train_x, self.train_y, schedule, b.lr_multipliers[ids],
                                  None if b.pull is None else b.pull[ids])
            if local_params is not None:
                local_params = trained if everyone else local_params.index_copy(0, user_ids, trained)
            updates = trained - start
            scale = update_scale[user_ids]
            if bool((scale != 1).any()):  # x 1 is the identity: no pass over the updates for it
                updates = updates * scale
            attackers = b.attackers[ids]
            if attackers.any():  # the attack's update side, before the protocol's upload
                updates = self.craft(round_, updates, attackers)
            sent = upload(updates, protocol, generator)
            if faulty_this_round(self.faults, round_):  # faulty clients, from the config's faults section
                sent = inject_faults(sent, self.faults, round_, seeded_generator(self.seed, round_, FAULT_STREAM),
                                     ids.tolist())
            # server side: only the uploads from here on; the guard leaves out Inf and outlying updates
            screen = screen_uploads(sent, quota, self.faults.max_norm_ratio)
            uploads = Uploads(round_, user_ids, screen.updates)
            if self.defense is None:
                decision = Aggregate(aggregate_per_coordinate(uploads.updates, present_rows(uploads.updates)))
            else:
                decision = self.defense.aggregate(uploads)
            if decision.rewind_to is not None:
                global_params, local_params, optimizer_state = self.rewind(round_, decision.rewind_to, local_params)
                round_ = decision.rewind_to + 1
                continue
            excluded = (present_rows(uploads.updates) & decision.excluded if decision.excluded is not None
                        else torch.zeros(len(user_ids), dtype=torch.bool, device=device))
            self.excluded.append(user_ids[excluded].tolist())
            if self.per_round is not None:
                self.participants.append(ids.tolist())
            step = decision.step
            if not torch.isfinite(step).all():  # finite updates can still overflow float32 when summed
                log.warning("  round %d: the aggregate overflowed; non-finite coordinates left unchanged", round_)
                step = torch.where(torch.isfinite(step), step, 0)
            before = global_params
            global_params, optimizer_state = server_step(self.server_optimizer, global_params, step, optimizer_state)
            if keep_step:  # what the model moved by (after the server's optimiser), not the aggregate
                self.last_step = global_params - before
            vector_to_parameters(global_params.clone(), self.module.parameters())  # it would alias
            evaluated = round_ % self.eval_every == 0 or round_ == self.rounds
            metrics = {**(self.evaluate() if evaluated else {"accuracy": None, "attack_success_rate": None}),
                       "excluded_users": float((excluded | screen.faulty).sum()),
                       "faulty_users": float(screen.faulty.sum()), "dropped_users": float(screen.dropped.sum()),
                       "incomplete_users": float(screen.incomplete.sum())}
            if self.per_round is not None:
                metrics.update(participants=float(len(ids)), attackers_present=float(attackers.sum()))
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
                self.checkpoint.save(self.state_dict(round_, global_params, local_params, optimizer_state))
            round_ += 1
        for cb in self.callbacks:
            cb.on_run_end(self)
        return self.evaluate()

    def rewind(self, round_: int, back: int,
               local_params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """A recovery at ``round_``: the global (and local) parameters and the server optimiser's state as they
        were after round ``back``, whose later rounds are forgotten (history, exclusions, participants) and
        trained again; returns them."""
        if back not in self.snapshots:
            raise RuntimeError(f"the defense asked to go back to round {back} at round {round_}, beyond the "
                               f"{len(self.snapshots)} rounds it declared (rewind_rounds)")
        # 2-tuples: checkpoints of before; a 4th item: the last step, for an attack with needs_last_step
        saved_global, saved_local, *saved_optimizer = self.snapshots[back]
        self.snapshots = {r: m for r, m in self.snapshots.items() if r <= back}
        global_params = saved_global.to(self.device)
        local_params = saved_local.to(self.device) if saved_local is not None else local_params
        optimizer_state = {k: v.to(self.device) for k, v in (saved_optimizer[0] if saved_optimizer else {}).items()}
        if self.attack.needs_last_step:  # the step into the model of round back (None: the initial model)
            saved_step = saved_optimizer[1] if len(saved_optimizer) > 1 else None
            self.last_step = saved_step.to(self.device) if saved_step is not None else None
        vector_to_parameters(global_params.clone(), self.module.parameters())
        self.history[:] = [h for h in self.history if h["round"] <= back]
        del self.excluded[back:]
        del self.participants[back:]
        self.rounds_retrained += round_ - back
        log.info("  round %d: recovery: back to the global model of round %d; rounds %d-%d trained again "
                 "without the flagged users", round_, back, back + 1, round_)
        if self.checkpoint is not None:
            self.checkpoint.save(self.state_dict(back, global_params, local_params, optimizer_state))
        return global_params, local_params, optimizer_state

    def state_dict(self, round_: int, global_params: torch.Tensor, local_params: torch.Tensor | None,
                   optimizer_state: dict) -> dict[str, Any]:
        """Everything the rounds after ``round_`` depend on. Their random streams (the sampler's too)
        derive from (seed, round, user), so the round index stands for them; the
        torch global generator (only model initialisation uses it) is saved anyway."""
        return {
            "round": round_,
            "global_params": global_params,
            "module": self.module.state_dict(),  # the buffers, if the model has any
            "local_params": local_params,  # None with theta_d = 1: every user starts from the global model
            "server_optimizer": optimizer_state,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "excluded": self.excluded,
            "participants": self.participants,
            "defense": self.defense.state_dict() if self.defense is not None else {},
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "snapshots": self.snapshots,
            "rounds_retrained": self.rounds_retrained,
            **({"last_step": self.last_step} if self.attack.needs_last_step else {}),
        }

    def load_state_dict(self, state: dict[str, Any], global_params: torch.Tensor,
                        local_params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Restore a :meth:`state_dict`; returns the global and local parameters and the server optimiser's state."""
        where = self.checkpoint.path if self.checkpoint is not None else "checkpoint"
        saved = state["global_params"]
        if saved.shape != global_params.shape or len(state["callbacks"]) != len(self.callbacks):
            raise CheckpointError(f"{where}: saved by a run with another model or defense; delete it to restart "
                                  "that arm from round 1")
        global_params = saved.to(self.device)  # checkpoints are loaded onto the CPU
        self.module.load_state_dict(state["module"])
        vector_to_parameters(global_params.clone(), self.module.parameters())
        torch.set_rng_state(state["torch_rng"])
        self.history[:] = state["history"]
        self.excluded[:] = state["excluded"]
        self.participants[:] = state.get("participants", [])  # absent from checkpoints of earlier versions
        if self.defense is not None:
            self.defense.load_state_dict(state["defense"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        self.snapshots = dict(state.get("snapshots", {}))
        self.rounds_retrained = state.get("rounds_retrained", 0)
        saved_step = state.get("last_step")  # only an attack with needs_last_step saves it
        self.last_step = saved_step.to(self.device) if saved_step is not None else None
        saved_local = state["local_params"]
        optimizer_state = {k: v.to(self.device) for k, v in state.get("server_optimizer", {}).items()}
        return global_params, saved_local.to(self.device) if saved_local is not None else local_params, optimizer_state
