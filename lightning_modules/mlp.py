"""One user's model: a multilayer perceptron with tanh hidden layers (the
paper's MNIST network is 784-128-64-10)."""

from __future__ import annotations

from typing import Iterable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class MLPClassifier(pl.LightningModule):
    """Defines the model, the loss and the optimiser of one user's local training.

    The collaborative loop trains all users at once with these same
    definitions (see ``pipeline.local_training``); a plain
    ``pytorch_lightning.Trainer`` can also fit this module on one user's data.
    """

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: Iterable[int] = (64, 32), lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        sizes = [in_features, *hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

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
