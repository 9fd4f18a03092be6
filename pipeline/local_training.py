"""Local training of every user at once.

All users share one architecture, so their parameters are stacked along a
leading user axis and trained together: one batched forward / backward per
step costs about one model's pass over the union of the users' batches,
instead of one Python loop per user. The LightningModule stays the single
definition of the layers, the loss and the optimiser.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

# parameter-free layers that act elementwise, so they apply to (users, batch, ...) as is
ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.Identity)


def user_generator(seed: int, round_: int, user: int) -> torch.Generator:
    """A generator per (seed, round, user): a user's batches do not depend on other users."""
    state = np.random.SeedSequence([seed, round_, user]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def user_batches(
    user_indices: list[torch.Tensor], epochs: list[int], batch_size: int, seed: int, round_: int
) -> torch.Tensor:
    """Mini-batch schedule of one round: a ``(steps, users, batch_size)`` tensor of
    sample indices, ``-1`` where a user has no sample at that position.

    User ``u`` runs ``epochs[u]`` epochs, each a fresh shuffle of its own
    indices cut into batches (the last one may be smaller); users that finish
    early simply have no batch in the remaining steps.
    """
    per_user = []
    for user, (indices, n_epochs) in enumerate(zip(user_indices, epochs)):
        g = user_generator(seed, round_, user)
        order = torch.cat([indices[torch.randperm(len(indices), generator=g)] for _ in range(n_epochs)])
        batches = [b for e in order.split(len(indices)) for b in e.split(batch_size)]
        per_user.append(batches)
    steps = max(len(b) for b in per_user)
    schedule = torch.full((steps, len(user_indices), batch_size), -1, dtype=torch.long)
    for user, batches in enumerate(per_user):
        for step, batch in enumerate(batches):
            schedule[step, user, : len(batch)] = batch
    return schedule


def stack_parameters(module: nn.Module, flat: torch.Tensor, num_users: int) -> dict[str, torch.Tensor]:
    """Every user's copy of the parameters in ``flat``, as ``{name: (users, *shape)}`` leaves."""
    stacked, offset = {}, 0
    for name, p in module.named_parameters():
        value = flat[offset : offset + p.numel()].view_as(p)
        stacked[name] = value.expand(num_users, *p.shape).clone().requires_grad_(True)
        offset += p.numel()
    return stacked


def flatten_stacked(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(users, P)``: each user's parameters in ``module.parameters()`` order."""
    return torch.cat([t.detach().flatten(1) for t in stacked.values()], dim=1)


def stacked_forward(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Forward pass of every user's model on its own batch: ``x`` is ``(users, batch, ...)``.

    A ``net`` of Linear and elementwise layers runs as batched matmuls (the
    fastest form measured on CPU); anything else falls back to ``vmap``.
    """
    layers = getattr(module, "net", None)
    if not isinstance(layers, nn.Sequential) or not all(isinstance(m, (nn.Linear, *ELEMENTWISE)) for m in layers):
        return vmap(lambda p, xb: functional_call(module, p, (xb,)))(params, x)
    h = x.flatten(2)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            h = torch.baddbmm(params[f"net.{i}.bias"].unsqueeze(1), h, params[f"net.{i}.weight"].transpose(1, 2))
        else:
            h = layer(h)
    return h


def train_users(
    module: nn.Module,
    global_params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: torch.Tensor,
    lr_multipliers: torch.Tensor,
) -> torch.Tensor:
    """Start every user from ``global_params``, run the ``schedule`` of
    mini-batches, and return the users' local parameters as ``(users, P)``.

    Each user minimises the mean loss of its own batch with the module's
    optimiser; user ``u``'s learning rate is scaled by ``lr_multipliers[u]``.
    """
    num_users = schedule.shape[1]
    params = stack_parameters(module, global_params, num_users)
    optimizer = module.make_optimizer(list(params.values()))
    for batch in schedule:
        valid = batch >= 0
        safe = batch.clamp(min=0)
        logits = stacked_forward(module, params, x[safe])
        losses = module.loss(logits.flatten(0, 1), y[safe].flatten(), reduction="none").view_as(batch)
        # users' parameters are disjoint: the gradient of the sum is each user's own gradient
        per_user = (losses * valid).sum(1) / valid.sum(1).clamp(min=1)
        optimizer.zero_grad(set_to_none=False)
        per_user.sum().backward()
        for p in params.values():
            p.grad.mul_(lr_multipliers.view(-1, *[1] * (p.dim() - 1)))
        optimizer.step()
    return flatten_stacked(params)
