"""MNIST (LeCun et al.): 60,000 training and 10,000 test images, 28x28 grey.

Read with ``torchvision.datasets.MNIST`` from ``root/MNIST/raw``; pixels are
scaled to [0, 1] and flattened to 784 features, as in the paper's MLP.
"""

from __future__ import annotations

import os

import torch
from torchvision.datasets import MNIST

from datamodules.data_root import DatasetCorruptError, DatasetMissingError, missing_reason, resolve_data_root
from datamodules.federated import FederatedDataModule


class MNISTDataModule(FederatedDataModule):
    """Federated MNIST (and, as a subclass, the datasets of the same format: Fashion-MNIST).

    Parameters
    ----------
    *args, **kwargs
        Passed to :class:`~datamodules.federated.FederatedDataModule`.
    root : str
        Dataset root in torchvision's layout (``root/MNIST/raw``);
        ``$AUROR_DATA_DIR`` overrides it.
    download : bool
        Download into ``root`` in :meth:`prepare_data` when missing.
    """

    num_classes = 10
    num_features = 784
    dataset = MNIST  # torchvision's class: it reads root/<its name>/raw and downloads there
    label = "MNIST"  # in messages

    def __init__(self, *args, root: str | os.PathLike, download: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.root, self.download = root, download

    @property
    def raw_folder(self):
        return resolve_data_root(self.root) / self.dataset.__name__ / "raw"

    def _files_present(self) -> bool:
        return all((self.raw_folder / f"{name}-ubyte").is_file()
                   for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"))

    def _open(self, train: bool, download: bool) -> MNIST:
        try:
            return self.dataset(resolve_data_root(self.root), train=train, download=download)
        except (RuntimeError, OSError, ValueError, AssertionError) as e:  # not found, no network, bad files
            if self._files_present():  # all there, yet unreadable: say so rather than "not found"
                raise DatasetCorruptError(self.label, self.raw_folder, e) from e
            raise DatasetMissingError(self.label, self.raw_folder, missing_reason(download, self.download)) from e

    def prepare_data(self) -> None:
        """Download both splits when ``download`` is true (Lightning calls this once, before setup)."""
        if self.download:
            for train in (True, False):
                self._open(train, download=True)

    def load_arrays(self):
        arrays = []
        for train in (True, False):
            ds = self._open(train, download=False)
            # the uint8 tensors directly: torchvision's __getitem__ goes through PIL one sample at a time
            x = ds.data.reshape(len(ds.data), -1).to(torch.float32).div_(255.0)
            arrays += [x.numpy(), ds.targets.to(torch.int64).numpy()]
        train_x, train_y, test_x, test_y = arrays
        return train_x, train_y, test_x, test_y
