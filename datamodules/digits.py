"""The embedded default dataset: scikit-learn's handwritten digits.

1,797 real 8x8 grey images of the digits 0-9 (UCI optdigits test set), shipped
inside scikit-learn, so it needs no download. Pixels (0-16) are scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from datamodules.federated import FederatedDataModule


class DigitsDataModule(FederatedDataModule):
    num_classes = 10
    num_features = 64

    def __init__(self, *args, test_fraction: float = 0.25, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.test_fraction = test_fraction

    def load_arrays(self):
        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int64)
        # stratified, seeded split: every class keeps its share of the test set
        train_x, test_x, train_y, test_y = train_test_split(
            x, y, test_size=self.test_fraction, stratify=y, random_state=self.hparams.seed
        )
        return train_x, train_y, test_x, test_y
