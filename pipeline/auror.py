"""AUROR (Shen, Tople, Saxena, ACSAC 2016): flag the users whose masked
features sit in the minority of too many indicative features.

The detector only ever sees a ``(users, features)`` matrix of uploaded
values: no data, no labels.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.clustering import two_means_1d


class Auror:
    """Detect poisoning users from their masked features.

    Parameters
    ----------
    alpha : float
        Indicative-feature threshold: a feature is indicative when the
        distance between its two 2-means centres exceeds the threshold.
    tau : float
        A user in the smaller cluster of more than this fraction of the
        indicative features (among those it uploaded) is flagged.
    alpha_mode : {"absolute", "quantile"}
        ``"absolute"``: the threshold is ``alpha`` itself. ``"quantile"``: the
        threshold is the ``alpha``-quantile of the observed centre distances.
    chunk_size : int
        Features scored at a time; bounds the memory beyond the clustering's.

    Attributes
    ----------
    centre_distance_ : ndarray (features,)  distance of the two centres (0 when unclustered)
    threshold_ : float                      the distance threshold used
    indicative_ : ndarray of bool (features,)
    scores_ : ndarray (users,)              fraction of indicative features where the user is in the minority
    flagged_ : ndarray of bool (users,)

    Examples
    --------
    >>> import numpy as np
    >>> updates = np.zeros((6, 4)); updates[0] = 1.0   # user 0 differs on every feature
    >>> Auror(alpha=0.5, tau=0.5).fit(updates).flagged_.nonzero()[0].tolist()
    [0]
    """

    def __init__(self, alpha: float = 0.02, tau: float = 0.5, alpha_mode: str = "absolute",
                 chunk_size: int = 4096) -> None:
        self.alpha = alpha
        self.tau = tau
        self.alpha_mode = alpha_mode
        self.chunk_size = chunk_size

    def fit(self, updates) -> "Auror":
        """Cluster every feature of ``updates`` (``users x features``, NaN where
        a user did not upload a feature) across users, and flag users."""
        if self.alpha_mode not in ("absolute", "quantile"):
            raise ValueError(f"alpha_mode must be 'absolute' or 'quantile', got {self.alpha_mode!r}")
        if not 0 <= self.tau < 1:
            raise ValueError(f"tau must be in [0, 1), got {self.tau!r}")
        values = torch.as_tensor(updates, dtype=torch.float32)
        if values.dim() != 2 or values.shape[0] < 2:
            raise ValueError(f"updates must be (users >= 2, features), got shape {tuple(values.shape)}")
        # numpy, in chunks of features: a whole-matrix mask would cost a quarter of
        # the matrix again, and per-chunk torch ops pay a thread barrier each
        matrix = values.cpu().numpy()
        chunks = range(0, matrix.shape[1], self.chunk_size)
        if any(np.isinf(matrix[:, i : i + self.chunk_size]).any() for i in chunks):
            raise ValueError("updates contain Inf; mark missing or faulty values as NaN")
        clusters = two_means_1d(values.T)
        distance = torch.nan_to_num(clusters.high - clusters.low, nan=0.0).cpu()  # clustered on the input's device
        if self.alpha_mode == "absolute":
            self.threshold_ = float(self.alpha)
        else:
            self.threshold_ = float(np.quantile(distance.numpy(), self.alpha))
        indicative = distance > self.threshold_

        in_minority = np.zeros(matrix.shape[0], dtype=np.int64)
        uploaded = np.zeros(matrix.shape[0], dtype=np.int64)
        upper_all, indicative_all = clusters.upper.cpu().numpy(), indicative.cpu().numpy()
        for i in chunks:
            rows = indicative_all[i : i + self.chunk_size]
            if not rows.any():
                continue
            upper = upper_all[i : i + self.chunk_size][rows]  # (indicative features, users)
            present = ~np.isnan(matrix[:, i : i + self.chunk_size][:, rows].T)
            n_upper = upper.sum(1, keepdims=True)
            n_lower = present.sum(1, keepdims=True) - n_upper
            # the smaller cluster is suspicious; on a tie neither is
            minority = np.where(n_upper < n_lower, upper, (n_lower < n_upper) & present & ~upper)
            in_minority += minority.sum(0)
            uploaded += present.sum(0)
        self.centre_distance_ = distance.numpy()
        self.indicative_ = indicative.numpy()
        self.scores_ = in_minority / np.maximum(uploaded, 1)
        self.flagged_ = self.scores_ > self.tau
        return self
