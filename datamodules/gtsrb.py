"""GTSRB (Stallkamp et al.): 43 classes of German traffic signs, 39,209 training
and 12,630 test images, as 3x32x32 float32 normalised per channel.

Decoding ~52k ``.ppm`` files takes seconds to minutes, so each split is decoded
once into a uint8 cache file (``cache_dir``, default ``$AUROR_CACHE_DIR`` or
``~/.cache/auror``) whose name holds a short hash of the source folder, the
file list and the decoding transform; later runs only load that file.

Normalisation: the per-channel mean and standard deviation are computed from
the training split as loaded (pixels in [0, 1]) and applied to both splits,
rather than fixed published values, because those were measured on the
original-size images and this project may read an already-resized copy. For
the full local copy (``shared/datasets``, resized to 32x32 bilinear) they are
mean (0.3398, 0.3117, 0.3210), std (0.2755, 0.2647, 0.2712).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import GTSRB

from datamodules.data_root import (
    DatasetCorruptError, DatasetMissingError, missing_reason, resolve_cache_dir, resolve_data_root,
)
from datamodules.federated import FederatedDataModule

IMAGE_SIZE = 32
# part of the cache key: bump it whenever decode_images changes its output
TRANSFORM = f"rgb-uint8-bilinear-{IMAGE_SIZE}-v1"

# binary PPM header: magic, width, height, maxval 255, each separated by whitespace or comments,
# then exactly one whitespace byte before the raster
_SEP = rb"(?:\s+|#[^\n]*\n)+"
_PPM_HEADER = re.compile(rb"P6" + _SEP + rb"(\d+)" + _SEP + rb"(\d+)" + _SEP + rb"255\s")


def _decode_one(path: str, size: int) -> np.ndarray:
    """One image as ``(size, size, 3)`` uint8."""
    with open(path, "rb") as f:
        data = f.read()
    m = _PPM_HEADER.match(data)
    n = size * size * 3
    if m and int(m[1]) == int(m[2]) == size and len(data) >= m.end() + n:
        # fast path: a binary PPM already at the target size is its raw RGB bytes (~6x faster than PIL)
        return np.frombuffer(data, np.uint8, n, m.end()).reshape(size, size, 3)
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)


def decode_images(paths: Sequence[str | os.PathLike], size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode image files into one ``(N, 3, size, size)`` uint8 array.

    Binary PPMs of the right size are read directly; anything else goes
    through PIL (RGB, bilinear resize to ``size`` x ``size``).
    """
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = _decode_one(str(path), size).transpose(2, 0, 1)
        except (OSError, ValueError, SyntaxError) as err:  # PIL: unidentified, truncated or damaged image
            raise DatasetCorruptError("GTSRB", path, err) from err
    return out


def gtsrb_samples(root: Path, split: str, download: bool = False, prepared: bool = False) -> list[tuple[str, int]]:
    """``(path, label)`` of every image of ``split`` ("train" or "test") under ``root/gtsrb``.

    Raises :class:`DatasetMissingError` when the files are missing or cannot be downloaded.
    """
    try:
        dataset = GTSRB(root, split=split, download=download)
    except (RuntimeError, OSError) as e:  # not found, download failed (URLError is an OSError), no CSV
        raise DatasetMissingError("GTSRB", root / "gtsrb", missing_reason(download, prepared)) from e
    return list(dataset._samples)  # torchvision's file list (no public accessor); __getitem__ would decode


def cache_path(cache_dir: Path, source: Path, split: str, samples: Sequence[tuple[str, int]]) -> Path:
    """Cache file of one split: the hash covers the source folder, the file list and :data:`TRANSFORM`."""
    key = hashlib.sha256(json.dumps([str(source), split, TRANSFORM, list(samples)]).encode()).hexdigest()[:12]
    return cache_dir / f"gtsrb-{split}-{key}.pt"


def load_or_decode(samples: Sequence[tuple[str, int]], cache_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``, from ``cache_file`` when it
    exists, else decoded from ``samples`` and written there atomically."""
    if cache_file.exists():
        try:
            cached = torch.load(cache_file, weights_only=True)
            return cached["images"], cached["labels"]
        except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, whatever the damage
            print(f"GTSRB: cache {cache_file} is unreadable ({type(err).__name__}); decoding again", flush=True)
    print(f"GTSRB: decoding {len(samples)} images once into {cache_file} ...", end=" ", flush=True)
    start = time.perf_counter()
    images = torch.from_numpy(decode_images([path for path, _ in samples]))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # temp file + rename: a concurrent or interrupted run never sees a half-written cache
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": images, "labels": labels}, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared AUROR_CACHE_DIR should stay readable
        os.replace(tmp, cache_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return images, labels


class GTSRBDataModule(FederatedDataModule):
    """Federated GTSRB; ``train_x`` and ``test_x`` are ``(N, 3, 32, 32)`` float32.

    Parameters
    ----------
    *args, **kwargs
        Passed to :class:`~datamodules.federated.FederatedDataModule`.
    root : str
        Dataset root in torchvision's layout (``root/gtsrb/GTSRB/...``);
        ``$AUROR_DATA_DIR`` overrides it.
    download : bool
        Download into ``root`` in :meth:`prepare_data` when missing.
    cache_dir : str, optional
        Where decoded splits are cached; default ``$AUROR_CACHE_DIR``, else ``~/.cache/auror``.

    After :meth:`setup`, ``mean_`` and ``std_`` hold the per-channel statistics used.
    """

    num_classes = 43
    input_shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    num_features = 3 * IMAGE_SIZE * IMAGE_SIZE

    def __init__(
        self, *args, root: str | os.PathLike, download: bool = False, cache_dir: str | os.PathLike | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.root, self.download, self.cache_dir = root, download, cache_dir

    def load_split(self, split: str, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of ``split``, decoded on first use and cached."""
        root = resolve_data_root(self.root).resolve()  # absolute, so the cache key does not depend on the cwd
        samples = gtsrb_samples(root, split, download, prepared=self.download)
        return load_or_decode(samples, cache_path(resolve_cache_dir(self.cache_dir), root / "gtsrb", split, samples))

    def prepare_data(self) -> None:
        """Download (when ``download`` is true) and decode both splits into the cache."""
        for split in ("train", "test"):
            self.load_split(split, download=self.download)

    def load_arrays(self):
        train_images, train_y = self.load_split("train")
        test_images, test_y = self.load_split("test")
        train_x = train_images.to(torch.float32).div_(255.0)
        test_x = test_images.to(torch.float32).div_(255.0)
        std, mean = torch.std_mean(train_x, dim=(0, 2, 3))
        self.mean_, self.std_ = mean, std
        for x in (train_x, test_x):
            x.sub_(mean.view(3, 1, 1)).div_(std.view(3, 1, 1))
        return train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy()
