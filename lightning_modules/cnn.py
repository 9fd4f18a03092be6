"""One user's model for images (GTSRB): two conv + max-pool blocks, then two
fully connected layers, as in the paper's "conv + max-pool, then fully
connected" description.

The default widths (16 and 32 channels, 128 hidden units, ~122k parameters)
are chosen for CPU: one training step of 30 users x 32 images takes about
0.13 s on 2 cores (``benchmarks/bench_conv_round.py``), while the wider
32/64/256 variant (~475k parameters) costs more and gives AUROR 4x more
features to cluster. Both are
one argument away. lr=0.1 learned fastest of {0.01, 0.05, 0.1} on GTSRB
(2 epochs over 8,000 images: 22%, 74%, 88% test accuracy).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_modules.base import ClassifierModule


class CNNClassifier(ClassifierModule):
    """conv(5x5)-ReLU-maxpool(2) twice, then Linear-ReLU-Linear.

    Parameters
    ----------
    num_classes : int
        Output classes (43 for GTSRB).
    input_shape : sequence of int
        ``(channels, height, width)`` of one image; flat inputs are reshaped to it.
    channels : sequence of two int
        Output channels of the two conv layers.
    hidden_size : int
        Width of the hidden fully connected layer.
    lr : float
        Learning rate of the plain SGD optimiser (``ClassifierModule.make_optimizer``).

    Examples
    --------
    >>> CNNClassifier(43)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 43])
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int] = (3, 32, 32),
        channels: Sequence[int] = (16, 32),
        hidden_size: int = 128,
        lr: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        in_channels, height, width = input_shape
        c1, c2 = channels
        # each block: 5x5 conv without padding (-4 pixels), then 2x2 max-pool (halves)
        out_h, out_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * out_h * out_w, hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def shape_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, *input_shape)``; flat inputs are reshaped to them."""
        return x.reshape(-1, *self.hparams.input_shape)
