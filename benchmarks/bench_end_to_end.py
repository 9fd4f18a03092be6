"""Benchmark: the MNIST experiment end to end, as a researcher runs it.

``auror run --params configs/mnist.yaml`` (30 users, 30% malicious, the
784-128-64-10 MLP, 30 rounds; arms benign, attack and auror) in a fresh
process, from the start of the command (imports, data loading, MLflow) to
the written report. Printed: the wall time, the peak resident memory of the
process, each arm's time (from its MLflow run's start and end), and the
ratio to the target of 2 minutes. Then, in this process, the compute bound:
the same arms trained and evaluated alone (``run_arm`` on data built before
the clock starts; no MLflow, no checkpoints, no imports), and the whole
process's ratio to it (goal <= 1.2 on MNIST), and the time of
``python -c "import torch"``: what the process spends beyond the bound and
torch's import is start-up (MLflow, data, models) and per-round logging
(goal <= 2 s on the digits default: ``--params params.yaml``).

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
BOUND_GOAL = 1.2
STARTUP_GOAL_S = 2.0


def arm_seconds(tracking_uri: str) -> dict[str, float]:
    """Each arm's duration, from its MLflow run's start and end times."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    return {row["tags.arm"]: (row["end_time"] - row["start_time"]).total_seconds() for _, row in runs.iterrows()}


def compute_bound(params: str, overrides: list[str]) -> dict[str, float]:
    """Each default arm's ``run_arm`` time in this process, on data built before the clock starts."""
    sys.path.insert(0, str(REPO))
    from pipeline.experiment.arms import DEFAULT_ARMS, DataCache, run_arm
    from pipeline.experiment.config import load_config

    cfg = load_config(params, overrides)
    data = DataCache()
    data.get(cfg, "benign")
    seconds = {}
    for arm in DEFAULT_ARMS:
        start = time.perf_counter()
        run_arm(cfg, arm, data=data)
        seconds[arm] = time.perf_counter() - start
    return seconds


def torch_import_s() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


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

    os.environ["AUROR_DATA_DIR"] = env["AUROR_DATA_DIR"]
    bound = compute_bound(args.params, ["data.download=false", *args.set])
    torch_s = torch_import_s()
    bound_s = sum(bound.values())
    figures = {"wall s": wall, "peak MiB": peak_mib, **{f"{arm} arm s": s for arm, s in arms.items()},
               "bound s": bound_s, "wall / bound": wall / bound_s, "torch import s": torch_s,
               "beyond bound and torch s": wall - bound_s - torch_s}
    print(f"  wall time, start to report      {wall:8.1f} s   ({wall / TARGET_S:.2f}x the {TARGET_S:.0f} s target)")
    for arm, seconds in arms.items():
        print(f"  {arm:<6} arm (MLflow run)         {seconds:8.1f} s")
    other = wall - sum(arms.values())
    print(f"  imports, data, MLflow set-up    {other:8.1f} s")
    print(f"  peak resident memory            {peak_mib:8.0f} MiB")
    print(f"  final metrics: {' '.join(report.split())}")
    print(f"  compute bound (the arms alone: {', '.join(f'{a} {s:.1f} s' for a, s in bound.items())})"
          f"  {bound_s:6.1f} s")
    print(f"  whole process / compute bound   {wall / bound_s:8.2f}x   (goal <= {BOUND_GOAL:g}x on MNIST)")
    print(f"  python -c 'import torch'        {torch_s:8.1f} s")
    print(f"  beyond the bound and torch      {wall - bound_s - torch_s:8.1f} s   (start-up and logging; goal <= "
          f"{STARTUP_GOAL_S:g} s on digits)")
    return figures


if __name__ == "__main__":
    main()
