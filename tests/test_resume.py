"""An `auror run` killed (SIGKILL) or interrupted (SIGINT, i.e. Ctrl-C) in the
middle of a random round continues with `auror run --resume` and ends with
exactly the metrics of an uninterrupted run, in the same MLflow runs."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap

import mlflow
import pytest
import torch

from pipeline.core.checkpoint import Checkpoint, CheckpointError
from pipeline.experiment.cli import main
from tests.conftest import TINY

ROUNDS = 4  # training.rounds in TINY
ARGS = [a for s in TINY for a in ("--set", s)]

# `auror run`, but the process signals itself when local training starts for the
# n-th time overall (3 arms x ROUNDS rounds): in the middle of a round, after the
# previous round's checkpoint
KILLER = textwrap.dedent("""
    import os, signal, sys
    import pipeline.core.loop
    from pipeline.experiment.cli import main

    sig, n = getattr(signal, sys.argv[1]), int(sys.argv[2])
    # Ctrl-C as in a terminal, also when this runs under a shell that ignores SIGINT (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    train, calls = pipeline.core.loop.train_users, []

    def train_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), sig)
        return train(*args, **kwargs)

    pipeline.core.loop.train_users = train_then_signal
    sys.exit(main(["run", *sys.argv[3:]]))
""")

# drawn once per session; the test id shows it, so a failure can be replayed
KILL_AT = random.randint(2, 3 * ROUNDS)
INTERRUPT_AT = random.randint(2, 3 * ROUNDS)


def run_killed(tmp_path, sig: str, n: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, sig, str(n), *ARGS], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def runs_of(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["auror"], output_format="list")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """latest.json and rounds.csv of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["run", *ARGS]) == 0
    finally:
        os.chdir(cwd)
    return json.loads((folder / "reports/latest.json").read_text()), (folder / "reports/rounds.csv").read_text()


def assert_resumed_like_uninterrupted(tmp_path, uninterrupted, what: str):
    latest, rounds = uninterrupted
    assert json.loads((tmp_path / "reports/latest.json").read_text()) == latest, what
    assert (tmp_path / "reports/rounds.csv").read_text() == rounds, what
    runs = runs_of(tmp_path)
    assert sorted(r.data.tags["arm"] for r in runs) == ["attack", "auror", "benign"], what  # the same runs, reopened
    client = mlflow.MlflowClient()
    for run in runs:
        assert run.info.status == "FINISHED", what
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")]
        assert steps == list(range(1, ROUNDS + 1)), what  # every round logged once
    assert not list((tmp_path / "mlruns/checkpoints").glob("*/*.pt")), "finished arms leave no checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("n", [KILL_AT])
def test_sigkill_then_resume_by_mlflow_run_id(n, tmp_path, monkeypatch, uninterrupted):
    what = f"SIGKILL in local training call {n} of {3 * ROUNDS}"
    killed = run_killed(tmp_path, "SIGKILL", n)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the id to resume with reached the (piped, so not a terminal's) output before the kill
    assert re.search(r"auror run --resume \d{8}-\d{6}-[0-9a-f]+\)", killed.stdout), killed.stdout
    running = [r for r in runs_of(tmp_path) if r.info.status == "RUNNING"]
    assert len(running) == 1, what  # a SIGKILLed process cannot end its run

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", running[0].info.run_id]) == 0
    assert_resumed_like_uninterrupted(tmp_path, uninterrupted, what)


@pytest.mark.slow
@pytest.mark.parametrize("n", [INTERRUPT_AT])
def test_ctrl_c_marks_the_run_killed_and_resumes_by_the_printed_id(n, tmp_path, monkeypatch, capsys, uninterrupted):
    what = f"SIGINT in local training call {n} of {3 * ROUNDS}"
    interrupted = run_killed(tmp_path, "SIGINT", n)
    assert interrupted.returncode == 130, interrupted.stderr
    assert "Traceback" not in interrupted.stderr + interrupted.stdout
    last = interrupted.stderr.strip().splitlines()[-1]
    assert last.startswith("auror: interrupted; the finished rounds are saved, continue with: auror run --resume ")
    statuses = sorted(r.info.status for r in runs_of(tmp_path))
    assert "KILLED" in statuses and "RUNNING" not in statuses, what

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", last.split()[-1]]) == 0
    assert_resumed_like_uninterrupted(tmp_path, uninterrupted, what)


def test_checkpoint_is_written_atomically_and_loaded_without_pickled_code(tmp_path):
    checkpoint = Checkpoint(tmp_path / "c" / "seed0-auror.pt", "auror|seed 0|abc")
    assert checkpoint.load() is None
    state = {"round": 3, "global_params": torch.arange(4.0), "local_params": None,
             "history": [{"round": r} for r in (1, 2, 3)]}
    checkpoint.save(state)
    loaded = checkpoint.load()
    assert loaded["round"] == 3 and torch.equal(loaded["global_params"], state["global_params"])
    assert [p.name for p in checkpoint.path.parent.iterdir()] == ["seed0-auror.pt"]  # no temporary file left
    whole = checkpoint.path.read_bytes()
    checkpoint.path.write_bytes(whole[:200])  # truncated in the payload
    with pytest.raises(CheckpointError, match="its content does not match its digest"):
        checkpoint.load()
    checkpoint.path.write_bytes(whole[:50])  # truncated in the header
    with pytest.raises(CheckpointError, match="damaged: its header or content is cut short"):
        checkpoint.load()


def refused(checkpoint: Checkpoint, why: str) -> None:
    with pytest.raises(CheckpointError) as err:
        checkpoint.load()
    assert str(err.value) == f"{checkpoint.path}: {why}; delete it to restart that arm from round 1"
    assert "weights_only" not in str(err.value)


def test_a_checkpoint_that_does_not_prove_itself_is_refused(tmp_path):
    """A flipped bit, a round counter that disagrees with the history, another config, another format."""
    path = tmp_path / "seed0-auror.pt"
    state = {"round": 2, "global_params": torch.arange(4.0), "history": [{"round": 1}, {"round": 2}]}
    Checkpoint(path, "key-a").save(state)
    data = bytearray(path.read_bytes())
    data[-10] ^= 1  # one bit of the weights' payload
    path.write_bytes(bytes(data))
    refused(Checkpoint(path, "key-a"), "its content does not match its digest (damaged or edited)")

    Checkpoint(path, "key-a").save({**state, "round": 30})  # re-saved with the tensors intact, the counter edited
    refused(Checkpoint(path, "key-a"), "its round counter (30) disagrees with its history of 2 rounds")

    Checkpoint(path, "key-a").save(state)
    refused(Checkpoint(path, "key-b"), "saved by a run of another config (key-a, this one is key-b)")

    torch.save(state, path)  # a plain torch file: what an older version wrote, or an edit
    refused(Checkpoint(path, "key-a"), "not a checkpoint of this version of auror's loop")


@pytest.mark.slow  # a killed process
def test_a_resume_refuses_a_tampered_checkpoint_before_reopening_any_run(tmp_path, monkeypatch, capsys):
    """`auror run` killed after round 2, its checkpoint's round counter set to the last round and re-saved:
    the resume is refused in one line (exit 2), naming the file, instead of reporting the round-2 model."""
    monkeypatch.chdir(tmp_path)
    killed = run_killed(tmp_path, "SIGKILL", 3)  # the benign arm's third round: its checkpoint holds rounds 1-2
    assert killed.returncode == -signal.SIGKILL
    (path,) = (tmp_path / "mlruns" / "checkpoints").glob("*/seed0-benign.pt")
    header, _, payload = path.read_bytes().partition(b"\n")
    state = torch.load(__import__("io").BytesIO(payload), weights_only=True)
    Checkpoint(path, header.split(b" ", 3)[3].decode()).save({**state, "round": ROUNDS})
    statuses = [r.info.status for r in runs_of(tmp_path)]
    assert main(["run", "--resume", path.parent.name]) == 2
    err = capsys.readouterr().err
    assert err == (f"auror: error: mlruns/checkpoints/{path.parent.name}/seed0-benign.pt: its round counter ({ROUNDS}) "
                   "disagrees with its history of 2 rounds; delete it to restart that arm from round 1\n")
    assert [r.info.status for r in runs_of(tmp_path)] == statuses  # no run reopened
