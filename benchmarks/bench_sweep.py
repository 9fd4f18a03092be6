"""Benchmark: a sweep's throughput with 1 and 2 workers, against the arms' own time.

The same small sweep (default: MNIST, ``--grid users.malicious_fraction=0.1,0.2,0.3``,
arms ``attack auror``, seed 0: 6 cells) is run by ``auror sweep`` once with one
worker and once with two worker processes sharing one SQLite sweep table, each
in a fresh temporary folder. Each worker gets ``OMP_NUM_THREADS`` = cores /
workers. Printed for each: the wall time from the first worker's start to the
last one's end, cells per hour, the sum of the cells' arm runs (each an
MLflow run, from its start to its end: the arm's training, evaluation and
logging) and the ratio of that sum to wall time x workers: the share of the
workers' time spent in the arms rather than imports, data set-up and claiming
(target >= 0.8). The last line: cells per hour with two workers over one.

Data: ``$AUROR_DATA_DIR`` (default ``../shared/datasets`` next to the
repository). Run: ``.venv/bin/python benchmarks/bench_sweep.py`` (``--help``).
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
TARGET = 0.8


def arm_run_seconds(tracking_uri: str) -> list[float]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    return [(row["end_time"] - row["start_time"]).total_seconds() for _, row in runs.iterrows()]


def run_sweep(workers: int, args: argparse.Namespace) -> dict[str, float]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "AUROR_DATA_DIR": os.environ.get("AUROR_DATA_DIR", str(DEFAULT_DATA_DIR)),
           "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="auror-bench-sweep-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        overrides = [f"tracking.tracking_uri={uri}", f"tracking.artifact_dir={tmp}/artifacts",
                     f"tracking.reports_dir={tmp}/reports", "data.download=false", *args.set]
        command = [sys.executable, "-m", "pipeline.experiment.cli", "sweep", "--params", args.params,
                   "--grid", *args.grid, "--arms", *args.arms, "--seeds", *map(str, args.seeds),
                   "--storage", f"sqlite:///{tmp}/sweeps.db", *(a for o in overrides for a in ("--set", o))]
        start = time.perf_counter()
        logs = [Path(tmp, f"worker{i}.txt") for i in range(workers)]
        procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
                 for log in logs]
        for proc, log in zip(procs, logs):
            if proc.wait() != 0:
                print(log.read_text()[-2000:].strip())
                sys.exit(1)
        wall = time.perf_counter() - start
        arms = arm_run_seconds(uri)
    return {"workers": workers, "threads": threads, "wall": wall, "cells": len(arms), "arms": sum(arms)}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO / "configs" / "mnist.yaml"))
    parser.add_argument("--grid", nargs="+", default=["users.malicious_fraction=0.1,0.2,0.3"])
    parser.add_argument("--arms", nargs="+", default=["attack", "auror"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    args = parser.parse_args(argv)

    print(f"$ auror sweep --params {args.params} --grid {' '.join(args.grid)} --arms {' '.join(args.arms)} "
          f"--seeds {' '.join(map(str, args.seeds))} {' '.join(args.set)}", flush=True)
    print(f"{'workers':>8} {'threads':>8} {'cells':>6} {'wall s':>8} {'cells/h':>8} {'arm runs s':>11} "
          f"{'arms / (wall x workers)':>24}")
    results = []
    for workers in args.workers:
        r = run_sweep(workers, args)
        r["per_hour"] = r["cells"] / r["wall"] * 3600
        r["share"] = r["arms"] / (r["wall"] * workers)
        results.append(r)
        print(f"{workers:>8} {r['threads']:>8} {r['cells']:>6} {r['wall']:>8.1f} {r['per_hour']:>8.0f} "
              f"{r['arms']:>11.1f} {r['share']:>24.2f}", flush=True)
    if len(results) > 1:
        print(f"cells per hour, {results[-1]['workers']} workers over {results[0]['workers']}: "
              f"{results[-1]['per_hour'] / results[0]['per_hour']:.2f}x; arms' share of the workers' time "
              f"(target >= {TARGET}): " + ", ".join(f"{r['share']:.2f}" for r in results))
    return results


if __name__ == "__main__":
    main()
