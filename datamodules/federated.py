"""A LightningDataModule that gives every user its own training set and keeps
a held-out test set. What malicious users do to their data is the attack's
(``pipeline.attacks``), applied after :meth:`FederatedDataModule.setup`."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.users import choose_malicious, dirichlet_partition, iid_partition


POISON_STREAM = 2  # the seed's random stream of an attack's data side (apart from the split's, 0, 1 and 3)


class FederatedDataModule(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`load_arrays`.

    After :meth:`setup`:

    - ``train_x``, ``train_y``: the union of the users' data (clean: an attack
      replaces them with what the malicious users hold);
    - ``clean_train_y``: the true labels; ``poisoned``: mask of the samples an attack changed (none here);
    - ``user_indices``: one index tensor into ``train_x`` per user;
    - ``malicious``: boolean tensor, one entry per user;
    - ``root_indices``: the server's clean root set (FLTrust): ``root_size``
      training samples drawn uniformly at random without replacement, after
      the split, and removed from every user's data (empty when ``root_size`` is 0);
    - ``test_x``, ``test_y``: the held-out test set.

    The split and the choice of malicious users depend only on ``seed``, so
    the benign arm and the attacked arms share them.
    """

    num_classes: int
    num_features: int

    def __init__(
        self,
        num_users: int,
        malicious_fraction: float,
        seed: int,
        partition: str = "iid",
        dirichlet_alpha: float = 0.5,
        min_samples: int = 1,
        root_size: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``train_x, train_y, test_x, test_y`` as float32 / int64 arrays."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        train_x, train_y, test_x, test_y = self.load_arrays()
        # one generator per purpose, so that changing one never shifts another (POISON_STREAM is the attack's)
        split_rng, malicious_rng, root_rng = (np.random.default_rng([h.seed, k]) for k in (0, 1, 3))
        if h.partition == "dirichlet":
            indices = dirichlet_partition(train_y, h.num_users, h.dirichlet_alpha, h.min_samples, split_rng)
        else:
            indices = iid_partition(len(train_y), h.num_users, split_rng)
        root = np.sort(root_rng.choice(len(train_y), size=h.root_size, replace=False))
        if h.root_size:  # the root set is the server's: no user holds those samples
            indices = [np.setdiff1d(i, root, assume_unique=True) for i in indices]
        malicious = choose_malicious(h.num_users, h.malicious_fraction, malicious_rng)
        self.train_x = torch.as_tensor(train_x)
        self.train_y = torch.as_tensor(train_y)
        self.clean_train_y = self.train_y
        self.poisoned = torch.zeros(len(train_y), dtype=torch.bool)
        self.user_indices = [torch.as_tensor(i) for i in indices]
        self.root_indices = torch.as_tensor(root, dtype=torch.long)
        self.malicious = torch.as_tensor(malicious)
        self.test_x = torch.as_tensor(test_x)
        self.test_y = torch.as_tensor(test_y)

    def poison_rng(self) -> np.random.Generator:
        """The attack's generator for the malicious users' data (seeded, its own stream)."""
        return np.random.default_rng([self.hparams.seed, POISON_STREAM])

    def user_dataset(self, user: int) -> TensorDataset:
        idx = self.user_indices[user]
        return TensorDataset(self.train_x[idx], self.train_y[idx])

    def user_dataloader(self, user: int, batch_size: int) -> DataLoader:
        return DataLoader(self.user_dataset(user), batch_size=batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test_x, self.test_y), batch_size=1024)
