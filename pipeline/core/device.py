"""Where a run's tensors live, and its seeded random streams."""

from __future__ import annotations

import os
import re

import numpy as np
from pipeline.lazy import torch

from pipeline.core.errors import ConfigError


def check_device_name(name: str, key: str) -> None:
    """A device name ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else a :class:`ConfigError` naming ``key``."""
    if re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name) is None:
        raise ConfigError(f"{key}: must be auto, cpu, cuda or cuda:N, got {name!r}")


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator: random draws are made on the CPU and then moved, so a
    run draws the same masks and noise on every device."""
    state = np.random.SeedSequence(keys).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def select_device(name: str = "auto", key: str = "training.device") -> torch.device:
    """The device of ``training.device``: ``"auto"`` is the first CUDA GPU when
    PyTorch sees one, else the CPU. Raises :class:`ConfigError`, naming ``key``,
    for a GPU that is not there.

    On CUDA it also makes PyTorch pick deterministic kernels (cuBLAS needs its
    workspace setting before its first use), so that the same config and seed
    give the same metrics there too; an operation with no deterministic kernel
    only warns.
    """
    check_device_name(name, key)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        seen = f"sees {count} CUDA GPU(s)" if count else "sees no CUDA GPU (torch.cuda.is_available() is False)"
        raise ConfigError(f"{key}: {name!r} asked for, but PyTorch {seen}; use auto or cpu")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def describe_device(device: torch.device) -> str:
    """``"cpu (2 threads)"`` or ``"cuda:0 (<GPU name>)"``: what a run's numbers depend on."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"
