"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 60,000 training and 10,000 test images of clothing, 28x28
grey, 10 classes, in MNIST's format and sizes, and harder: the same MLP reaches about 0.85 where it reaches
0.95 on MNIST.

Read with ``torchvision.datasets.FashionMNIST`` from ``root/FashionMNIST/raw``; pixels scaled to [0, 1] and
flattened to 784 features, as for MNIST. Classes: 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat,
5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot.
"""

from __future__ import annotations

from torchvision.datasets import FashionMNIST

from datamodules.mnist import MNISTDataModule


class FashionMNISTDataModule(MNISTDataModule):
    """Federated Fashion-MNIST (the arguments of :class:`~datamodules.mnist.MNISTDataModule`;
    ``root/FashionMNIST/raw`` in torchvision's layout)."""

    dataset = FashionMNIST
    label = "Fashion-MNIST"
