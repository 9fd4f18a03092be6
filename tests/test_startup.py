"""Commands that answer at once: help, the listings and every refusal of a bad config or name load neither
torch, Lightning, MLflow, Optuna, scikit-learn nor matplotlib (``pipeline.lazy``). Timed by
``benchmarks/bench_startup.py``; here, what is imported."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pytorch_lightning", "mlflow", "optuna", "sklearn", "matplotlib", "torchvision", "sqlalchemy")

# what a user types that must answer before any heavy import: (argv, exit code, what stderr / stdout says)
QUICK = [
    (["--help"], 0, "usage: auror"),
    (["run", "--help"], 0, "usage: auror run"),
    (["tune", "--help"], 0, "usage: auror tune"),
    (["defenses"], 0, "krum"),
    (["attacks"], 0, "label_flip"),
    (["run", "--set", "users.malicious_fraction=1.5"], 2, "users.malicious_fraction: must be in [0, 0.5)"),
    (["run", "--set", "attack.boots=2"], 2, "attack.boots: unknown key"),
    (["run", "--set", "defense.auror.window_rounds=99"], 2, "defense.auror.window_rounds: must be in"),
    (["run", "--arms", "bogus"], 2, "--arms: must be benign, attack or a registered defense"),
    (["run", "--arms", "krum", "--set", "protocol.theta_u=0.1"], 2, "protocol.theta_u: must be 1 for defense krum"),
    (["compare", "--attacks", "bogus"], 2, "--attacks"),
    (["compare", "--arms", "bogus"], 2, "--arms"),
    (["sweep", "--grid", "bogus=1,2"], 2, "bogus"),
    (["sweep", "--grid", "users.num_users=3,3"], 2, "users.num_users"),
    (["diagnose", "--defenses", "bogus"], 2, "--defenses"),
    (["tune", "--kind", "bogus"], 2, "--kind"),
    (["tune", "--defense", "bogus"], 2, "--defense"),
    (["report", "--seeds", "-1"], 2, "--seeds"),
    (["run", "--bogus"], 2, "unrecognized arguments"),
    (["bogus"], 2, "invalid choice"),
]

PROBE = """
import contextlib, io, json, sys
from pipeline.experiment.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    streams = [io.TextIOWrapper(io.BytesIO()) for _ in range(2)]  # main() sets line buffering on stdout
    with contextlib.redirect_stdout(streams[0]), contextlib.redirect_stderr(streams[1]):
        try:
            code = main(argv)
        except SystemExit as exit:  # --help
            code = exit.code
    for stream in streams:
        stream.flush()
    out.append([code, "".join(s.buffer.getvalue().decode() for s in streams)])
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"results": out, "heavy": heavy}))
"""


def test_help_listings_and_refusals_import_nothing_heavy(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps([a for a, _, _ in QUICK]), json.dumps(HEAVY)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.splitlines()[-1])
    for (argv, code, says), (got, text) in zip(QUICK, probe["results"]):
        assert got == code and says in text, (argv, got, text[-300:])
    assert probe["heavy"] == [], f"imported before answering: {probe['heavy']}"


def test_the_lazy_name_is_the_module_once_used():
    from pipeline.lazy import OnFirstUse

    import torch

    lazy = OnFirstUse("torch")
    assert lazy.zeros is torch.zeros and isinstance(torch.ones(2), lazy.Tensor)
    with pytest.raises(ModuleNotFoundError):
        OnFirstUse("no_such_module_here").anything
