"""Writes tests/data/auror_scores_mnist.json: AUROR's scores at every window of 15-round MNIST runs (30 users),
every attack of the comparison at IID 30% and Dirichlet(0.5) 30% and nobody attacking (IID, Dirichlet(0.5)),
seeds 0-2; deciding every 3 rounds with tau = 0.999 (almost nobody flagged: every window scores everyone).

    AUROR_DATA_DIR=../shared/datasets .venv/bin/python tests/data/collect_auror_scores.py   # about 10 minutes

The gap rule's tests (tests/test_auror_guard.py) read it: the recorded score distributions it was chosen on.
"""

import json
from pathlib import Path

from pipeline.api import load_config, run_arm
from pipeline.experiment.config import with_overrides
from pipeline.experiment.grid import DIRICHLET, IID

ROOT = Path(__file__).resolve().parents[2]
ATTACKS = ["label_flip", "alie", "auror_adaptive", "backdoor", "ipm", "min_max", "model_replacement"]


def main() -> None:
    base = load_config(ROOT / "configs/mnist.yaml")
    settings = [(a, s) for a in ATTACKS for s in (IID[0.3], DIRICHLET)] + [("none", IID[0.3]), ("none", DIRICHLET)]
    runs = {}
    for seed in (0, 1, 2):
        for attack, setting in settings:
            overrides = [*setting.overrides, f"attack.name={'label_flip' if attack == 'none' else attack}",
                         f"seed={seed}", "training.rounds=15", "defense.auror.redetect_every=3",
                         "defense.auror.tau=0.999"]
            if attack == "none":
                overrides.append("users.malicious_fraction=0.0")
            result = run_arm(with_overrides(base, overrides), "auror")
            runs[f"{attack}|{setting.label}|{seed}"] = {
                "malicious": result.detection["malicious_users"],
                "windows": [{k: d[k] for k in ("round", "num_indicative_features", "scores")}
                            for d in result.detection["detections"]]}
            print(attack, setting.label, seed, flush=True)
    out = ROOT / "tests/data/auror_scores_mnist.json"
    out.write_text(json.dumps({"num_features": result.detection["num_features"], "runs": runs}, separators=(",", ":")))


if __name__ == "__main__":
    main()
