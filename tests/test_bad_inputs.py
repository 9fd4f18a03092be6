"""Every row of docs/bad_inputs.md: exit code 2, exactly the documented one-line
message on stderr, no traceback, no MLflow run (not even the mlruns folder)."""

import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.experiment.cli import main

TABLE = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


def rows() -> list[tuple[str, str, str, str]]:
    """``(number, command, setup, message)`` of every table row."""
    out = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            out.append((cells[0], cells[2].strip("`"), cells[3], cells[4].strip("`")))
    return out


def truncated_mnist(folder: Path) -> None:
    """The four MNIST files, each a valid IDX header followed by 100 bytes."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 60000), ("t10k", 10000)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n, 28, 28) + bytes(100))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + bytes(100))


def without_a_gpu(cwd: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")


NAMED_SETUPS = {
    "-": lambda cwd: None,
    "a machine without a CUDA GPU": without_a_gpu,
    "empty folder `nodata`": lambda cwd: (cwd / "nodata").mkdir(),
    "empty folder `empty`": lambda cwd: (cwd / "empty").mkdir(),
    "truncated MNIST files in `baddata`": lambda cwd: truncated_mnist(cwd / "baddata"),
    # files of more than one line
    "`params.yaml` giving `users:` twice": lambda cwd: (cwd / "params.yaml").write_text(
        "users:\n  num_users: 4\nusers:\n  min_samples: 5\n"),
    "`params.yaml` giving `users.num_users` twice": lambda cwd: (cwd / "params.yaml").write_text(
        "users:\n  num_users: 4\n  num_users: 5\n"),
}


def set_up(setup: str, cwd: Path) -> None:
    file = re.fullmatch(r"`([^`]+)`: `([^`]*)`", setup)  # a file holding one line
    if file:
        path = cwd / file[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(file[2] + "\n")
    else:
        NAMED_SETUPS[setup](cwd)


ROWS = rows()


def test_the_table_has_at_least_20_rows_with_distinct_commands():
    assert len(ROWS) >= 20 and len({(c, s) for _, c, s, _ in ROWS}) == len(ROWS)
    assert all(message.startswith("auror: error: ") for *_, message in ROWS)


@pytest.mark.parametrize("number, command, setup, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(number, command, setup, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    set_up(setup, tmp_path)
    given = sorted(tmp_path.rglob("*"))
    argv = shlex.split(command)
    assert argv[0] == "auror"
    assert main(argv[1:]) == 2
    captured = capsys.readouterr()
    assert captured.err == message + "\n"
    assert "Traceback" not in captured.out + captured.err
    assert sorted(tmp_path.rglob("*")) == given  # nothing made: no mlruns/, no report, no lock file


@pytest.mark.slow
def test_a_real_process_prints_no_traceback(tmp_path):
    """The truncated-dataset row, in its own process: torchvision raises deep inside."""
    number, command, setup, message = next(r for r in ROWS if "truncated" in r[2])
    set_up(setup, tmp_path)
    env = {k: v for k, v in __import__("os").environ.items() if k != "AUROR_DATA_DIR"}
    done = subprocess.run([sys.executable, "-m", "pipeline.experiment.cli", *shlex.split(command)[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2
    assert done.stderr == message + "\n" and "Traceback" not in done.stdout
    assert not (tmp_path / "mlruns").exists()
