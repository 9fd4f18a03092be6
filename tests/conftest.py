import pytest

from pipeline.experiment.config import load_config

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
