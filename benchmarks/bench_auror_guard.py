"""Benchmark: what ``auror_guard`` costs over a whole run, recovery included.

The MNIST comparison's cell (``configs/mnist.yaml``: 30 users, 30% malicious label flippers, the
784-128-64-10 MLP, 30 rounds, seed 0): the undefended arm (``attack``: the per-coordinate mean) and
``auror_guard`` (a decision every 3 rounds; on its first flags, at round 3, the rounds 1-3 trained
again without them), each trained and evaluated by ``run_arm`` on data built before the clock starts,
in turns, ``--repeats`` times; the best of each is compared (the machine may be shared). Printed: each
arm's seconds, the rounds ``auror_guard`` trained again, and the ratio (goal <= 1.2).

Data: MNIST from ``$AUROR_DATA_DIR`` (default ``../shared/datasets`` next to the repository); without
it, it says so and exits 1. ``--set key=value`` overrides the config (e.g. ``--set attack.name=backdoor``).

Run: ``.venv/bin/python benchmarks/bench_auror_guard.py``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.2
ARMS = ("attack", "auror_guard")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "configs" / "mnist.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("AUROR_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
    sys.path.insert(0, str(REPO))
    from datamodules.data_root import DatasetMissingError
    from pipeline.experiment.arms import DataCache, run_arm
    from pipeline.experiment.config import load_config

    cfg = load_config(args.params, args.set)
    data = DataCache()
    try:
        data.get(cfg, "attack")
    except DatasetMissingError as err:
        sys.exit(f"bench_auror_guard: {err}")
    best = {arm: float("inf") for arm in ARMS}
    retrained = 0
    for _ in range(args.repeats):
        for arm in ARMS:
            start = time.perf_counter()
            result = run_arm(cfg, arm, data=data)
            best[arm] = min(best[arm], time.perf_counter() - start)
            retrained = result.detection.get("rounds_retrained", retrained)
    ratio = best["auror_guard"] / best["attack"]
    print(f"{cfg.data.name}, {cfg.users.num_users} users, {cfg.training.rounds} rounds, attack {cfg.attack.name}, "
          f"best of {args.repeats}:")
    print(f"  attack (no defense)  {best['attack']:7.2f} s")
    print(f"  auror_guard          {best['auror_guard']:7.2f} s  ({retrained} rounds trained again)")
    print(f"  ratio                {ratio:7.2f} x the undefended arm (goal <= {GOAL})")
    return {**best, "ratio": ratio, "rounds_retrained": retrained}


if __name__ == "__main__":
    main()
