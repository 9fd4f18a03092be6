"""Where a run's tensors live, and its seeded random streams."""

from __future__ import annotations

import ctypes
import os
import platform
import re

import numpy as np
from pipeline.lazy import torch

from pipeline.core.errors import ConfigError


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_allocator_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back to the system.

    A round allocates and frees tensors of (users, parameters) many times: 44 MB each for 100 users of the
    MNIST MLP. glibc serves every allocation above 32 MB (less before its threshold adapts) with a fresh
    ``mmap``, so each one faults its pages in again, zeroed by the kernel: the time goes to the system, not to
    the arithmetic (a sampled round of 100 users of 60 samples: 93 -> 64 ms, ``bench_cross_device.py`` with and
    without ``--glibc-malloc-defaults``). With no ``mmap`` and no trimming below 2 GiB every allocation reuses
    the heap's pages: the resident set stays near its peak until the process ends; the numbers are the same.
    Idempotent; returns whether it applies (glibc only).
    """
    global _allocator_kept
    if _allocator_kept is None:
        _allocator_kept = platform.libc_ver()[0] == "glibc"
        if _allocator_kept:
            libc = ctypes.CDLL("libc.so.6")
            _allocator_kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _allocator_kept


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
