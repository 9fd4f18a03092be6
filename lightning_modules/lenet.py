"""LeNet-5 for 28x28 grey images (MNIST, Fashion-MNIST): the CNN FLPoison evaluates MNIST with.

LeCun et al. 1998, with ReLU and max-pooling as the federated-learning literature uses it:
conv(5x5, 6, padding 2) - pool - conv(5x5, 16) - pool - 120 - 84 - classes (61,706 parameters
for 10 classes). Users train it together in one grouped pass (``pipeline.core.local_training``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_modules.base import ClassifierModule


class LeNet5Classifier(ClassifierModule):
    """LeNet-5: two conv + max-pool blocks, then 120-84-classes.

    Parameters
    ----------
    num_classes : int
    input_shape : sequence of int
        ``(channels, height, width)``: 28x28 (the first conv pads 2, giving LeNet's 32x32); flat inputs
        are reshaped to it.
    lr : float
        Learning rate of the plain SGD optimiser.

    Examples
    --------
    >>> LeNet5Classifier(10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int] = (1, 28, 28), lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        channels, height, width = input_shape
        out_h, out_w = ((height // 2) - 4) // 2, ((width // 2) - 4) // 2
        self.net = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * out_h * out_w, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def shape_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.hparams.input_shape)
