"""Where datasets and decoded caches live, and the error raised when a dataset is missing.

Datasets use torchvision's layout under one root folder (``MNIST/raw/...``,
``gtsrb/GTSRB/...``). The environment variable ``AUROR_DATA_DIR`` overrides the
configured root, so one machine can point every run at its copy without
editing ``params.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "AUROR_DATA_DIR"
CACHE_DIR_ENV = "AUROR_CACHE_DIR"


def resolve_data_root(configured: str | os.PathLike) -> Path:
    """The dataset root: ``$AUROR_DATA_DIR`` when set (and non-empty), else ``configured``.

    Examples
    --------
    >>> os.environ[DATA_DIR_ENV] = "/data"
    >>> resolve_data_root("../shared/datasets")
    PosixPath('/data')
    >>> del os.environ[DATA_DIR_ENV]
    """
    return Path(os.environ.get(DATA_DIR_ENV) or configured).expanduser()


def resolve_cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """Folder for decoded-dataset caches: ``configured``, else ``$AUROR_CACHE_DIR``, else ``~/.cache/auror``."""
    return Path(configured or os.environ.get(CACHE_DIR_ENV) or "~/.cache/auror").expanduser()


NOT_DOWNLOADED = "and download is off"
DOWNLOAD_FAILED = "and could not be downloaded (no network?)"
NOT_PREPARED = "and download=true only acts in prepare_data() (call it before setup())"


def missing_reason(tried_download: bool, download_enabled: bool) -> str:
    """The reason shown by :class:`DatasetMissingError`, from what was attempted."""
    if tried_download:
        return DOWNLOAD_FAILED
    return NOT_PREPARED if download_enabled else NOT_DOWNLOADED


class DatasetMissingError(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message is one line that says how to fix it.

    Parameters
    ----------
    dataset : str
        Name shown to the user, e.g. ``"MNIST"``.
    folder : str or Path
        The folder that was searched.
    reason : str
        Why it is missing, continuing "... not found under FOLDER": e.g.
        :data:`NOT_DOWNLOADED` or :data:`DOWNLOAD_FAILED`.
    """

    def __init__(self, dataset: str, folder: str | os.PathLike, reason: str = NOT_DOWNLOADED) -> None:
        self.dataset, self.folder = dataset, Path(folder)
        super().__init__(
            f"{dataset} not found under {folder} {reason}: set data.root or {DATA_DIR_ENV} to a folder "
            "holding it in torchvision's layout (see docs/configuration.md), or run once with data.download=true and internet access"
        )


class DatasetCorruptError(DatasetMissingError):
    """The dataset's files are there but cannot be read (truncated, damaged); one line that says how to fix it.

    A :class:`DatasetMissingError`, so that every place reporting a missing dataset reports this one too.
    """

    def __init__(self, dataset: str, folder: str | os.PathLike, error: BaseException) -> None:
        self.dataset, self.folder = dataset, Path(folder)
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        RuntimeError.__init__(
            self,
            f"{dataset} under {folder} is unreadable ({detail}): a file is truncated or damaged; replace it "
            f"with a good copy (or delete it and run with data.download=true), or point data.root or "
            f"{DATA_DIR_ENV} at another copy",
        )
