"""One user's model: a multilayer perceptron with tanh hidden layers (the
paper's MNIST network is 784-128-64-10)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lightning_modules.base import ClassifierModule


class MLPClassifier(ClassifierModule):
    """Defines the model, the loss and the optimiser of one user's local training.

    The collaborative loop trains all users at once with these same
    definitions (see ``pipeline.core.local_training``); a plain
    ``pytorch_lightning.Trainer`` can also fit this module on one user's data.
    The loss, the optimiser and the steps are ``ClassifierModule``'s.
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

    def shape_input(self, x: torch.Tensor) -> torch.Tensor:
        """Flat features: ``(batch, in_features)``, as the batched local training assumes."""
        return x.flatten(1)
