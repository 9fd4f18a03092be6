import importlib
import importlib.util
import os
import sys
import types

import pytest

from pipeline.experiment.config import load_config


def pytest_configure(config):
    """Under pytest-xdist (``make test-fast``: ``-n auto``), each worker takes its share of the cores for torch
    and for the commands it starts: every worker's threads on every core would spin against the others'
    (on 2 cores, 2 workers of 2 threads took 253 s where 2 of 1 took 132 s)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


TINY = [
    "users.num_users=5", "users.malicious_fraction=0.4", "training.rounds=4", "training.hidden_sizes=[16]",
    "defense.auror.window_rounds=2", "training.batch_size=32",
    "training.device=cpu",  # the same numbers on every machine; tests/test_device.py runs CUDA where there is one
]


@pytest.fixture
def tiny_config(tmp_path):
    """A CPU-only config that runs all three arms in about a second, tracking under tmp_path."""
    return load_config(None, [
        *TINY,
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"tracking.artifact_dir={tmp_path}/mlruns/artifacts",
        f"tracking.reports_dir={tmp_path}/reports",
    ])


@pytest.fixture(scope="module")
def byzfl():
    """byzfl's aggregators (a test-only dependency; skipped without it), imported without
    running ``byzfl/__init__``, which imports torchvision and its benchmark (5 to 15 s)."""
    if "byzfl" in sys.modules:
        return importlib.import_module("byzfl.aggregators")
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        pytest.skip("byzfl is not installed")
    stub = types.ModuleType("byzfl")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = stub
    try:
        return importlib.import_module("byzfl.aggregators")
    finally:  # leave no trace: a later `import byzfl` loads the real package afresh
        for name in [m for m in sys.modules if m == "byzfl" or m.startswith("byzfl.")]:
            del sys.modules[name]
