"""Local training of every user at once.

All users share one architecture, so their parameters are stacked along a
leading user axis and trained together: one batched forward / backward per
step costs about one model's pass over the union of the users' batches,
instead of one Python loop per user. The LightningModule stays the single
definition of the layers, the loss and the optimiser: the module passed in is
a ``lightning_modules.base.LocalModel`` (a ``typing.Protocol``), that is, an
``nn.Module`` with a ``net`` (``nn.Sequential``) that ``forward`` applies to the
shaped input, ``loss(logits, y, reduction=...)``, ``make_optimizer(params,
lr_multiplier)`` and ``hparams.lr``; ``ClassifierModule`` implements it.

What makes it fast (``benchmarks/bench_round.py`` measures it against one
model trained on the union of the data, the same arithmetic):

- a ``net`` of Linear and elementwise layers runs as batched matmuls
  (``torch.baddbmm``) over weights kept pre-transposed, ``(users, in, out)``,
  so a weight's gradient ``h^T g`` comes out in the weight's own layout (no
  transpose copy); a step's batch is one ``index_select`` of the data;
- each user's mean loss and learning-rate multiplier are folded into one
  per-sample weight, precomputed for the whole schedule: one weighted sum
  per step, no masks and no pass over the gradients to rescale them;
- when the module's optimiser is plain SGD (no momentum, no weight decay),
  the backward pass of such a net is written out and each weight is updated
  in place as it is differentiated, ``W -= lr * h^T g`` in one
  ``baddbmm_`` with the optimiser's own learning rate: no gradient tensor
  is stored, zeroed or read back. Any other optimiser (or architecture) gets
  its gradients from ``torch.autograd.grad`` as ``.grad`` and steps itself;
- a convolutional ``net`` runs as one grouped pass (``grouped_layers``): its
  convolutions get one group per user and its GroupNorm each user's groups,
  over a batch whose channels are the users' channels side by side
  (channels-last), then batched matmuls after ``Flatten``; on the CPU six
  users per pass (``CPU_USERS_PER_PASS``), which kept the pass in cache;
- everything is created on the device of ``x``, so the same code runs on CUDA;
- ``user_batches`` pads each shuffled epoch and places it with one slice
  assignment per user instead of one per batch.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from lightning_modules.base import LocalModel

# parameter-free layers that act elementwise, so they apply to (users, batch, ...) as is
ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.Identity)


def user_generator(seed: int, round_: int, user: int) -> torch.Generator:
    """A generator per (seed, round, user): a user's batches do not depend on other users."""
    state = np.random.SeedSequence([seed, round_, user]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def user_batches(
    user_indices: list[torch.Tensor], epochs: list[int], batch_size: int, seed: int, round_: int,
    streams: list[int] | None = None,
) -> torch.Tensor:
    """Mini-batch schedule of one round: a ``(steps, users, batch_size)`` tensor of
    sample indices, ``-1`` where a user has no sample at that position.

    User ``u`` runs ``epochs[u]`` epochs, each a fresh shuffle of its own
    indices cut into batches (the last one may be smaller); users that finish
    early simply have no batch in the remaining steps. User ``u`` shuffles with
    the random stream ``streams[u]`` (default: ``u``).
    """
    per_user = []
    for user, (indices, n_epochs) in enumerate(zip(user_indices, epochs)):
        g = user_generator(seed, round_, user if streams is None else streams[user])
        # each epoch a fresh shuffle, padded with -1 to whole batches (its last batch may be short)
        pad = torch.full(((-len(indices)) % batch_size,), -1, dtype=torch.long, device=indices.device)
        shuffles = [torch.cat([indices[torch.randperm(len(indices), generator=g)].long(), pad])
                    for _ in range(n_epochs)]
        per_user.append(torch.cat(shuffles).view(-1, batch_size) if shuffles else pad.new_empty(0, batch_size))
    steps = max(len(b) for b in per_user)
    schedule = torch.full((steps, len(user_indices), batch_size), -1, dtype=torch.long)
    for user, batches in enumerate(per_user):
        schedule[: len(batches), user] = batches
    return schedule


def stack_parameters(module: LocalModel, flat: torch.Tensor, num_users: int) -> dict[str, torch.Tensor]:
    """Every user's copy of the parameters, as ``{name: (users, *shape)}`` leaves.

    ``flat`` is one parameter vector ``(P,)`` shared by all users, or one per user ``(users, P)``.
    """
    flat = flat.expand(num_users, -1)
    stacked, offset = {}, 0
    for name, p in module.named_parameters():
        value = flat[:, offset : offset + p.numel()].reshape(num_users, *p.shape)
        stacked[name] = value.clone().requires_grad_(True)
        offset += p.numel()
    return stacked


def flatten_stacked(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(users, P)``: each user's parameters in ``module.parameters()`` order."""
    return torch.cat([t.detach().flatten(1) for t in stacked.values()], dim=1)


def per_user_forward(module: LocalModel, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Every user's model on its own batch, one ``functional_call`` per user: ``x`` is
    ``(users, batch, ...)``. The path of any ``net`` that neither fast path takes."""
    return torch.stack([
        functional_call(module, {name: p[user] for name, p in params.items()}, (x[user],))
        for user in range(x.shape[0])
    ])


def moved_probabilities(module: LocalModel, start: torch.Tensor, updates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The class probabilities (rows, N, classes) of ``module`` with the parameters ``start`` (P,) moved by
    each row of ``updates`` (rows, P), on the inputs ``x`` (N, ...): one model at a time, in eval mode."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        params = stack_parameters(module, start + updates.to(start), len(updates))
        probabilities = per_user_forward(module, params, x.expand(len(updates), *x.shape)).softmax(-1)
    module.train(was_training)
    return probabilities


class UsersFlatten(nn.Module):
    """``(batch, users * C, H, W)`` -> ``(users, batch, C * H * W)``: each user's flattened features."""

    def __init__(self, users: int):
        super().__init__()
        self.users = users

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[0], self.users, -1).transpose(0, 1)


class UsersLinear(nn.Module):
    """Every user's ``Linear`` on its own features ``(users, batch, in)``: one batched matmul."""

    def __init__(self, users: int, layer: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(users, layer.out_features, layer.in_features, device="meta"))
        self.bias = None if layer.bias is None else nn.Parameter(torch.empty(users, layer.out_features, device="meta"))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.weight.transpose(1, 2)
        return torch.bmm(h, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), h, weight)


# Users per grouped pass on the CPU (on CUDA: all of them). A round of 30 users x 128 samples, batch 32,
# took (seconds, all in one pass / 6 per pass / one at a time) ResNet-8 3.8 / 2.2 / 2.4, the GTSRB CNN
# 0.53 / 0.41 / 0.54, LeNet-5 0.18 / 0.17 / 0.41: past a few users the pass outgrows the caches.
CPU_USERS_PER_PASS = 6

# parameter-free layers that act on each channel of an image alone
CHANNELWISE = (*ELEMENTWISE, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _stack_channels(layer: nn.Module, users: int) -> nn.Module | None:
    """``layer`` rebuilt for images whose channels are the users' channels side by side, or None."""
    if isinstance(layer, nn.Conv2d):  # one group per user (times the layer's own groups)
        return nn.Conv2d(users * layer.in_channels, users * layer.out_channels, layer.kernel_size, layer.stride,
                         layer.padding, layer.dilation, users * layer.groups, layer.bias is not None,
                         layer.padding_mode, device="meta")
    if isinstance(layer, nn.GroupNorm):  # the users' groups side by side, normalised apart
        return nn.GroupNorm(users * layer.num_groups, users * layer.num_channels, layer.eps, layer.affine,
                            device="meta")
    if isinstance(layer, CHANNELWISE):
        return layer
    if isinstance(layer, nn.Sequential) or getattr(layer, "channelwise", False):
        if next(layer.parameters(recurse=False), None) is not None:
            return None
        children = {name: _stack_channels(child, users) for name, child in layer.named_children()}
        if any(child is None for child in children.values()):
            return None
        stacked = copy.copy(layer)  # the same forward, over the rebuilt children
        stacked._modules = children
        return stacked
    return None


def grouped_layers(module: LocalModel, users: int) -> nn.Module | None:
    """``module.net`` rebuilt to train ``users`` models in one pass, or None when it is not of this form:
    image layers (``Conv2d``, ``GroupNorm``, pooling, elementwise, blocks that declare ``channelwise``),
    then ``Flatten``, then ``Linear`` and elementwise layers.

    The image layers see one batch ``(batch, users * C, H, W)`` holding every user's channels side by
    side: a convolution with one group per user, a GroupNorm with each user's groups, so no user's
    channels meet another's. After ``Flatten`` each user's features are ``(users, batch, F)`` and each
    ``Linear`` is a batched matmul. Its parameters are named as ``net``'s and shaped as views of the
    stacked ``(users, *shape)`` ones (on the meta device: ``functional_call`` supplies them).
    """
    layers = getattr(module, "net", None)
    if not isinstance(layers, nn.Sequential) or not hasattr(module, "shape_input"):
        return None
    flatten = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Flatten)]
    if not flatten or not any(isinstance(m, nn.Conv2d) for m in layers[: flatten[0]].modules()):
        return None
    head = [_stack_channels(layer, users) for layer in layers[: flatten[0]]]
    tail = layers[flatten[0] + 1 :]
    if any(layer is None for layer in head) or not all(isinstance(m, (nn.Linear, *ELEMENTWISE)) for m in tail):
        return None
    tail = [UsersLinear(users, m) if isinstance(m, nn.Linear) else m for m in tail]
    return nn.Sequential(*head, UsersFlatten(users), *tail)


def linear_layers(module: LocalModel) -> nn.Sequential | None:
    """``module.net`` when it is a ``Sequential`` of Linear and elementwise layers
    holding all of the module's parameters (the batched-matmul path), else None."""
    layers = getattr(module, "net", None)
    if not isinstance(layers, nn.Sequential) or not all(isinstance(m, (nn.Linear, *ELEMENTWISE)) for m in layers):
        return None
    if any(getattr(m, "inplace", False) for m in layers) or not any(isinstance(m, nn.Linear) for m in layers):
        return None
    own = {f"net.{name}" for name, _ in layers.named_parameters()}
    return layers if own == {name for name, _ in module.named_parameters()} else None


def plain_sgd_groups(optimizer: torch.optim.Optimizer) -> list[tuple[list[torch.Tensor], float]] | None:
    """``[(params, lr), ...]`` when ``optimizer`` is SGD without momentum, weight
    decay, Nesterov or maximize (its step is ``p -= lr * grad``), else None."""
    if type(optimizer) is not torch.optim.SGD:
        return None
    groups = []
    for group in optimizer.param_groups:
        if group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"]:
            return None
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return None
        groups.append((list(group["params"]), float(lr)))
    return groups


def linear_sgd_step(
    module: LocalModel,
    layers: nn.Sequential,
    leaves: dict[str, torch.Tensor],
    lr_of: dict[int, float],
    xb: torch.Tensor,
    yb: torch.Tensor,
    sample_weight: torch.Tensor,
) -> None:
    """One plain-SGD step of every user's Linear / elementwise ``net``, backward pass written out.

    ``leaves`` hold weights pre-transposed ``(users, in, out)`` and biases
    ``(users, 1, out)``; ``lr_of`` maps ``id(leaf)`` to its learning rate. Each
    weight is updated in place, ``W -= lr * h^T g`` in one ``baddbmm_``, after
    the gradient for the layer below was taken from it: no gradient tensor is
    ever stored. Autograd only differentiates the loss and the elementwise
    layers (small tensors).
    """
    linear = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
    saved: list = []
    with torch.no_grad():
        h = xb
        for i, layer in enumerate(layers):
            if i in linear:
                saved.append(h)
                weight, bias = leaves[f"net.{i}.weight"], leaves.get(f"net.{i}.bias")
                h = torch.bmm(h, weight) if bias is None else torch.baddbmm(bias, h, weight)
            else:
                with torch.enable_grad():
                    pre = h.requires_grad_(True)
                    out = layer(pre)
                saved.append((pre, out))
                h = out.detach()
        with torch.enable_grad():
            logits = h.requires_grad_(True)
            loss = (module.loss(logits.flatten(0, 1), yb, reduction="none") * sample_weight).sum()
            (g,) = torch.autograd.grad(loss, logits)
        for i in reversed(range(linear[0], len(layers))):
            if i in linear:
                weight, bias = leaves[f"net.{i}.weight"], leaves.get(f"net.{i}.bias")
                below = torch.bmm(g, weight.transpose(1, 2)) if i > linear[0] else None  # before the update
                if bias is not None:
                    bias.sub_(g.sum(1, keepdim=True), alpha=lr_of[id(bias)])
                weight.baddbmm_(saved[i].transpose(1, 2), g, alpha=-lr_of[id(weight)])
                g = below
            else:
                pre, out = saved[i]
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(out, pre, g)


def train_users(
    module: LocalModel,
    global_params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: torch.Tensor,
    lr_multipliers: torch.Tensor,
    pull: torch.Tensor | None = None,
) -> torch.Tensor:
    """Start every user from ``global_params`` (``(P,)``, or ``(users, P)``: one start each), run the ``schedule`` of
    mini-batches, and return the users' local parameters as ``(users, P)``.

    Each user minimises the mean loss of its own batch with the module's
    optimiser; user ``u``'s learning rate is scaled by ``lr_multipliers[u]``
    (its gradient is scaled, which for SGD is the same). ``pull[u] > 0`` adds
    ``pull[u] / 2 * ||theta_u - start_u||^2`` to user ``u``'s loss: after each of
    its steps its parameters move ``lr * pull[u]`` of the way back towards its
    start (an attacker's anomaly term, see ``model_replacement``). Everything runs
    on the device of ``x``; the result is there too.

    Users with fewer local epochs (or fewer samples) finish early. With plain
    SGD, which keeps no state, each run of steps with the same users still
    training is trained on those users only (with 9 of 30 users at 3 epochs
    instead of 1, that halves the work of a round); an optimiser with state
    (momentum) trains everyone at every step and holds finished users still.
    """
    steps, num_users, _ = schedule.shape
    start = global_params.detach().to(x.device).expand(num_users, -1)  # a view: _train_together copies it once
    if plain_sgd_groups(module.make_optimizer(list(module.parameters()))) is None:
        return _train_together(module, start, x, y, schedule, lr_multipliers, pull)
    training, lengths = torch.unique_consecutive((schedule >= 0).any(2), dim=0, return_counts=True)
    if len(training) == 1 and bool(training[0].all()):  # everyone trains at every step: one group, no gather
        return _train_together(module, start, x, y, schedule, lr_multipliers, pull)
    local = start.clone()
    start = 0
    for users, length in zip(training, lengths.tolist()):
        users = users.nonzero().squeeze(1)
        if len(users):
            local[users.to(x.device)] = _train_together(
                module, local[users.to(x.device)], x, y, schedule[start : start + length, users], lr_multipliers[users],
                None if pull is None else pull[users],
            )
        start += length
    return local


def _train_together(
    module: LocalModel,
    flat: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: torch.Tensor,
    lr_multipliers: torch.Tensor,
    pull: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`train_users` for users that all train at every step of ``schedule``;
    ``flat`` is ``(users, P)``."""
    device = x.device
    steps, num_users, batch_size = schedule.shape
    schedule = schedule.to(device)
    layers = linear_layers(module)
    grouped = None if layers is not None else grouped_layers(module, num_users)
    if grouped is not None and device.type == "cpu" and num_users > CPU_USERS_PER_PASS:
        return torch.cat([
            _train_together(module, flat[users], x, y, schedule[:, users], lr_multipliers[users],
                            None if pull is None else pull[users])
            for users in torch.arange(num_users).split(CPU_USERS_PER_PASS)
        ])
    batch_major = False  # whether a step's rows come batch-major, (batch, users), instead of (users, batch)
    if layers is not None:  # leaves: weights pre-transposed (users, in, out), biases (users, 1, out)
        leaves: dict[str, torch.Tensor] = {}
        slices, offset = {}, 0
        for name, p in module.named_parameters():  # one copy of each: the transposition's, or a clone
            slices[name] = (offset, offset + p.numel(), tuple(p.shape))
            value = flat.expand(num_users, -1)[:, offset : offset + p.numel()].reshape(num_users, *p.shape)
            value = value.transpose(1, 2) if name.endswith("weight") else value.unsqueeze(1)
            value = value.clone(memory_format=torch.contiguous_format)  # never a view of the start
            leaves[name] = value.requires_grad_(True)
            offset += p.numel()
        inputs = x.reshape(len(x), -1)

        def forward(xb: torch.Tensor) -> torch.Tensor:  # xb: (users, batch, features)
            h = xb
            for i, layer in enumerate(layers):
                if isinstance(layer, nn.Linear):
                    weight, bias = leaves[f"net.{i}.weight"], leaves.get(f"net.{i}.bias")
                    h = torch.bmm(h, weight) if bias is None else torch.baddbmm(bias, h, weight)
                else:
                    h = layer(h)
            return h

        def result() -> torch.Tensor:  # each leaf copied once, into its columns
            out = torch.empty(num_users, offset, dtype=flat.dtype, device=device)
            for name, t in leaves.items():
                start, stop, shape = slices[name]
                value = t.detach().transpose(1, 2) if name.endswith("weight") else t.detach().squeeze(1)
                out[:, start:stop].view(num_users, *shape).copy_(value)
            return out
    else:
        leaves = stack_parameters(module, flat, num_users)
        inputs = x
        if grouped is not None:  # the users' channels side by side, one pass (channels-last: faster on CPU)
            batch_major = True
            shapes = {f"net.{name}": p.shape for name, p in grouped.named_parameters()}

            def forward(xb: torch.Tensor) -> torch.Tensor:  # xb: (batch, users, ...)
                images = module.shape_input(xb.flatten(0, 1))
                h = images.view(batch_size, num_users * images.shape[1], *images.shape[2:])
                h = h.contiguous(memory_format=torch.channels_last)
                return functional_call(grouped, {name[4:]: leaves[name].view(shapes[name]) for name in leaves}, (h,))
        else:  # any other architecture: functional_call per user

            def forward(xb: torch.Tensor) -> torch.Tensor:
                return per_user_forward(module, leaves, xb)

        def result() -> torch.Tensor:
            return flatten_stacked(leaves)

    params = list(leaves.values())
    optimizer = module.make_optimizer(params)
    sgd = plain_sgd_groups(optimizer)
    lr_of = {id(p): lr for group, lr in sgd for p in group} if sgd is not None else {}
    fused = layers is not None and sgd is not None and set(map(id, params)) <= set(lr_of)

    # per-sample weight of the summed loss: 1 / (user's batch size) * user's multiplier, 0 on padding;
    # users' parameters are disjoint, so the gradient of the sum is each user's own (scaled) gradient
    valid = schedule >= 0
    scale = lr_multipliers.to(device=device, dtype=flat.dtype) / valid.sum(2).clamp(min=1)  # (steps, users)
    sample_weight = (valid * scale.unsqueeze(2)).flatten(1)  # (steps, users * batch)
    rows = schedule.clamp(min=0).flatten(1)  # (steps, users * batch)
    x_rows = schedule.clamp(min=0).transpose(1, 2).flatten(1) if batch_major else rows
    x_shape = (batch_size, num_users) if batch_major else (num_users, batch_size)
    pulled = None
    if pull is not None and bool((pull > 0).any()):
        lr_default = float(module.hparams.lr)
        pulled = [(p, p.detach().clone(), lr_of.get(id(p), lr_default)) for p in params]  # (leaf, start, lr)
        pull = pull.to(device=device, dtype=flat.dtype)
    for step in range(steps):
        yb = y.index_select(0, rows[step])
        xb = inputs.index_select(0, x_rows[step]).view(*x_shape, *inputs.shape[1:])
        if fused:
            linear_sgd_step(module, layers, leaves, lr_of, xb, yb, sample_weight[step])
            if pulled is not None:
                _pull_back(pulled, pull * valid[step].any(1))
            continue
        losses = module.loss(forward(xb).flatten(0, 1), yb, reduction="none")
        grads = torch.autograd.grad((losses * sample_weight[step]).sum(), params)
        for p, g in zip(params, grads):
            p.grad = g
        finished = ~valid[step].any(1)  # their epochs are over; a stateful step would still move them
        kept = [p.detach()[finished].clone() for p in params] if finished.any() else None
        optimizer.step()
        if kept is not None:
            with torch.no_grad():
                for p, value in zip(params, kept):
                    p[finished] = value
        if pulled is not None:
            _pull_back(pulled, pull * valid[step].any(1))
    return result()


def _pull_back(pulled: list[tuple[torch.Tensor, torch.Tensor, float]], weight: torch.Tensor) -> None:
    """One gradient step of ``weight[u] / 2 * ||p_u - start_u||^2`` for every leaf (users first)."""
    with torch.no_grad():
        for p, start, lr in pulled:
            p.sub_((p - start) * (lr * weight).view(-1, *[1] * (p.dim() - 1)))
