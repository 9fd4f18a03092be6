"""A small ResNet for 32x32 RGB images (GTSRB, CIFAR-10), with GroupNorm instead of BatchNorm.

He et al. 2016's CIFAR ResNet with one basic block per stage (ResNet-8: a stem conv, three
stages of one two-conv block at 16, 32, 64 channels, global average pooling, a linear layer;
78,042 parameters for 10 classes). BatchNorm's running statistics are per user and would leak
into every update-based defense (and are buffers, not uploaded parameters); GroupNorm normalises
each sample on its own, as federated learning uses it (Hsieh et al. 2020).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_modules.base import ClassifierModule


def conv_norm(in_channels: int, out_channels: int, stride: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels)]


class BasicBlock(nn.Module):
    """Two 3x3 conv + GroupNorm, a ReLU between and after; the shortcut is a strided 1x1 conv
    + GroupNorm when the shape changes."""

    # forward only adds and rectifies its branches' outputs, channel by channel: local training may run
    # it over many users' channels side by side (``pipeline.core.local_training.grouped_layers``)
    channelwise = True

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(*conv_norm(in_channels, out_channels, stride, groups), nn.ReLU(),
                                  *conv_norm(out_channels, out_channels, 1, groups))
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.GroupNorm(groups, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet8Classifier(ClassifierModule):
    """ResNet-8 with GroupNorm.

    Parameters
    ----------
    num_classes : int
    input_shape : sequence of int
        ``(channels, height, width)`` of one image; flat inputs are reshaped to it.
    widths : sequence of three int
        The channels of the three stages.
    groups : int
        GroupNorm's groups (each width must be a multiple).
    lr : float
        Learning rate of the plain SGD optimiser.

    Examples
    --------
    >>> ResNet8Classifier(10)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int] = (3, 32, 32),
                 widths: Sequence[int] = (16, 32, 64), groups: int = 4, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        w1, w2, w3 = widths
        self.net = nn.Sequential(
            *conv_norm(input_shape[0], w1, 1, groups), nn.ReLU(),
            BasicBlock(w1, w1, 1, groups), BasicBlock(w1, w2, 2, groups), BasicBlock(w2, w3, 2, groups),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes),
        )

    def shape_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.hparams.input_shape)
