"""Benchmark: how fast the commands that need no training answer, against Python and torch's own start.

Each command runs in a fresh process ``--repeats`` times (the median is printed): ``python -c pass``
(the floor), ``python -c "import torch"`` (what a command that loaded torch would pay at least), then
``auror --help``, ``auror run --help``, ``auror defenses``, ``auror attacks``, a refused config value and a
refused arm name. Printed beside each: its ratio to the torch import. Goal: every ``auror`` line under 1 s
on a quiet machine (torch and the rest are imported on first use: ``pipeline/lazy.py``).

Run: ``.venv/bin/python benchmarks/bench_startup.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 1.0
AUROR = [sys.executable, "-m", "pipeline.experiment.cli"]
COMMANDS = {
    'python -c "pass"': [sys.executable, "-c", "pass"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "auror --help": [*AUROR, "--help"],
    "auror run --help": [*AUROR, "run", "--help"],
    "auror defenses": [*AUROR, "defenses"],
    "auror attacks": [*AUROR, "attacks"],
    "auror run --set users.malicious_fraction=1.5": [*AUROR, "run", "--set", "users.malicious_fraction=1.5"],
    "auror run --arms bogus": [*AUROR, "run", "--arms", "bogus"],
}


def seconds(command: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, capture_output=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (the median is shown)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="auror-bench-") as cwd:  # no params.yaml there: the defaults
        times = {name: statistics.median(seconds(c, cwd) for _ in range(args.repeats))
                 for name, c in COMMANDS.items()}
    torch_s = times['python -c "import torch"']
    print(f"median of {args.repeats} fresh processes each:")
    for name, s in times.items():
        flag = "" if not name.startswith("auror") else ("  ok" if s < GOAL_S else f"  over the {GOAL_S:g} s goal")
        print(f"  {name:<48} {s:6.2f} s  {s / torch_s:5.2f}x the torch import{flag}")
    return times


if __name__ == "__main__":
    main()
