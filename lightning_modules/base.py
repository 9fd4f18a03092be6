"""What every user's model shares: the ``LocalModel`` contract that
``pipeline.core.local_training`` trains against, and ``ClassifierModule``,
the LightningModule that implements it once for the MLP and the CNN.

A concrete model only builds its layers as ``self.net`` (an ``nn.Sequential``)
and says how one batch of inputs is shaped for them (``shape_input``); the
loss, the optimiser and the Lightning steps are defined here.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class LocalModel(Protocol):
    """What ``pipeline.core.local_training`` needs of a user's model.

    ``train_users`` stacks every user's copy of the parameters and trains
    them all at once, so it cannot call the module's Lightning hooks; it
    relies on these members instead. A model is also expected to be a
    ``torch.nn.Module`` (it is passed to ``torch.func.functional_call``).

    A ``net`` of image layers (``Conv2d``, ``GroupNorm``, pooling, elementwise), then ``Flatten``,
    then Linear and elementwise layers trains in one grouped pass, given ``shape_input``; a block
    inside it that only combines its submodules' outputs channel by channel (a residual block)
    says so with a class attribute ``channelwise = True``.
    """

    @property
    def net(self) -> nn.Sequential:
        """The layers. A ``Sequential`` of Linear and elementwise layers holding all
        parameters (named ``net.{i}.weight`` / ``net.{i}.bias``) runs as batched
        matmuls on flattened inputs; any other ``net`` falls back to ``forward``."""
        ...

    @property
    def hparams(self) -> Any:
        """The hyperparameters; ``hparams.lr`` is the base learning rate that
        ``make_optimizer`` scales per user."""
        ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: ``net(shape_input(x))``. Run per user (``functional_call``) when
        ``net`` is neither a Linear stack nor groupable; for a Linear stack the fast
        path assumes the shaping is ``x.flatten(1)``, so ``forward`` must agree with it."""
        ...

    def shape_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs as ``net`` takes it, sample by sample (images ``(batch, C, H, W)``
        for a convolutional ``net``)."""
        ...

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The training loss, called with ``reduction="none"``: one value per sample,
        which local training weights per user (mean over the user's batch,
        times the user's learning-rate multiplier) and sums."""
        ...

    def make_optimizer(self, params: Iterable[torch.Tensor], lr_multiplier: float = 1.0) -> torch.optim.Optimizer:
        """The local optimiser over ``params`` (the stacked users' tensors). Plain SGD
        (no momentum, weight decay, Nesterov) enables the fused in-place update
        with its own learning rate; any other optimiser steps itself."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The global model's parameters, in the order of the flat parameter vector."""
        ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        """As ``parameters``, with the names ``functional_call`` and the fast path look up."""
        ...


class ClassifierModule(pl.LightningModule):
    """A classifier trained with cross-entropy and plain SGD; implements ``LocalModel``.

    Subclasses call ``self.save_hyperparameters()`` (with an ``lr`` argument)
    and assign ``self.net`` in their ``__init__``, and override
    ``shape_input`` when the layers need another input shape.
    """

    @property
    def net(self) -> nn.Sequential:
        # Assigning self.net still goes through nn.Module.__setattr__ (the submodule is
        # registered as usual); declaring it on the class as well lets
        # isinstance(module, LocalModel) find it on Python >= 3.12, where runtime-checkable
        # protocols look members up with inspect.getattr_static (which does not see _modules).
        try:
            return self._modules["net"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no net: assign self.net in __init__") from None

    def shape_input(self, x: torch.Tensor) -> torch.Tensor:
        """One batch of inputs as ``net`` takes it (here: unchanged)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.shape_input(x))

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction=reduction)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_accuracy", (self(x).argmax(1) == y).float().mean())

    def make_optimizer(self, params, lr_multiplier: float = 1.0) -> torch.optim.Optimizer:
        """Plain SGD, as in the paper's local training."""
        return torch.optim.SGD(params, lr=self.hparams.lr * lr_multiplier)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())
