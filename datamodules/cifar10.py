"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test colour images, 32x32, 10 classes.

For users who have the data (``root/cifar-10-batches-py`` in torchvision's layout: the pickled batches
``data_batch_1`` .. ``data_batch_5`` and ``test_batch``) or internet access: with ``download`` a missing
copy is fetched by ``torchvision.datasets.CIFAR10``. The batches are read here directly (each a pickled
dict of ``data``, ``(N, 3072)`` uint8 in channel-major order, and ``labels``), so that any copy in that
format loads. Pixels are scaled to [0, 1] and normalised with the training set's per-channel mean and
standard deviation, as for GTSRB; inputs are ``(N, 3, 32, 32)`` float32.

Classes: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse, 8 ship, 9 truck.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from datamodules.data_root import DatasetCorruptError, DatasetMissingError, missing_reason, resolve_data_root
from datamodules.federated import FederatedDataModule

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def read_batch(path: os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch: ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10DataModule(FederatedDataModule):
    """Federated CIFAR-10; ``train_x`` and ``test_x`` are ``(N, 3, 32, 32)`` float32.

    Parameters
    ----------
    *args, **kwargs
        Passed to :class:`~datamodules.federated.FederatedDataModule`.
    root : str
        Dataset root in torchvision's layout (``root/cifar-10-batches-py``); ``$AUROR_DATA_DIR`` overrides it.
    download : bool
        Download into ``root`` in :meth:`prepare_data` when missing.

    After :meth:`setup`, ``mean_`` and ``std_`` hold the per-channel statistics used.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    num_features = 3 * 32 * 32

    def __init__(self, *args, root: str | os.PathLike, download: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.root, self.download = root, download

    @property
    def folder(self):
        return resolve_data_root(self.root) / FOLDER

    def _files_present(self) -> bool:
        return all((self.folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH))

    def prepare_data(self) -> None:
        """Download the archive when ``download`` is true and the batches are missing."""
        if self.download and not self._files_present():
            from torchvision.datasets import CIFAR10

            try:
                CIFAR10(resolve_data_root(self.root), train=True, download=True)
            except (RuntimeError, OSError, ValueError) as e:  # no network, a broken archive
                raise DatasetMissingError("CIFAR-10", self.folder, missing_reason(True, True)) from e

    def load_arrays(self):
        if not self._files_present():
            raise DatasetMissingError("CIFAR-10", self.folder, missing_reason(False, self.download))
        try:
            train = [read_batch(self.folder / name) for name in TRAIN_BATCHES]
            test_images, test_y = read_batch(self.folder / TEST_BATCH)
        except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as e:  # all there, unreadable
            raise DatasetCorruptError("CIFAR-10", self.folder, e) from e
        train_x = torch.from_numpy(np.concatenate([x for x, _ in train])).to(torch.float32).div_(255.0)
        test_x = torch.from_numpy(test_images).to(torch.float32).div_(255.0)
        std, mean = torch.std_mean(train_x, dim=(0, 2, 3))
        self.mean_, self.std_ = mean, std
        for x in (train_x, test_x):
            x.sub_(mean.view(3, 1, 1)).div_(std.view(3, 1, 1))
        return train_x.numpy(), np.concatenate([y for _, y in train]), test_x.numpy(), test_y
