"""Benchmark: the MNIST experiment end to end, as a researcher runs it.

``auror run --params configs/mnist.yaml`` (30 users, 30% malicious, the
784-128-64-10 MLP, 30 rounds; arms benign, attack and auror) in a fresh
process, from the start of the command (imports, data loading, MLflow) to
the written report. Printed: the wall time, the peak resident memory of the
process, each arm's time (from its MLflow run's start and end), and the
ratios to the target of 2 minutes.

The MLflow store and the reports go to a temporary folder, so the benchmark
leaves nothing behind. Data: ``$AUROR_DATA_DIR`` (default ``../shared/datasets``
next to the repository); without MNIST there, it says so and exits 1.

Run: ``.venv/bin/python benchmarks/bench_end_to_end.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "datasets"
TARGET_S = 120.0


def arm_seconds(tracking_uri: str) -> dict[str, float]:
    """Each arm's duration, from its MLflow run's start and end times."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    return {row["tags.arm"]: (row["end_time"] - row["start_time"]).total_seconds() for _, row in runs.iterrows()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO / "configs" / "mnist.yaml"), help="config of the experiment")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    args = parser.parse_args(argv)

    env = {**os.environ, "AUROR_DATA_DIR": os.environ.get("AUROR_DATA_DIR", str(DEFAULT_DATA_DIR))}
    with tempfile.TemporaryDirectory(prefix="auror-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        overrides = [f"tracking.tracking_uri={uri}", f"tracking.artifact_dir={tmp}/artifacts",
                     f"tracking.reports_dir={tmp}/reports", "data.download=false", *args.set]
        command = [sys.executable, "-m", "pipeline.experiment.cli", "run", "--params", args.params,
                   *(a for o in overrides for a in ("--set", o))]
        print(f"$ auror run --params {args.params} {' '.join(args.set)}", flush=True)
        output = Path(tmp, "output.txt")
        with output.open("w") as out:
            start = time.perf_counter()
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
            wall = time.perf_counter() - start
            process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            print(output.read_text()[-2000:].strip())
            sys.exit(1)
        peak_mib = usage.ru_maxrss / 1024  # KiB on Linux
        arms = arm_seconds(uri)
        report = Path(tmp, "reports", "latest.json").read_text()

    figures = {"wall s": wall, "peak MiB": peak_mib, **{f"{arm} arm s": s for arm, s in arms.items()}}
    print(f"  wall time, start to report      {wall:8.1f} s   ({wall / TARGET_S:.2f}x the {TARGET_S:.0f} s target)")
    for arm, seconds in arms.items():
        print(f"  {arm:<6} arm (MLflow run)         {seconds:8.1f} s")
    other = wall - sum(arms.values())
    print(f"  imports, data, MLflow set-up    {other:8.1f} s")
    print(f"  peak resident memory            {peak_mib:8.0f} MiB")
    print(f"  final metrics: {' '.join(report.split())}")
    return figures


if __name__ == "__main__":
    main()
