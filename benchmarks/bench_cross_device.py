"""Benchmark: a round of 100 users sampled out of 1,000 or 10,000, against one model on the same samples.

Setting (the cross-device issue's): MNIST split into ``num_users`` users of equal size, 100 of them
sampled per round (``users.per_round``), one local epoch, batch 32, the MNIST MLP 784-128-64-10 tanh,
plain averaging (no defense), no evaluation but at the end (``training.eval_every``; a 100-sample test
set). Each case runs :class:`~pipeline.core.loop.CollaborativeLoop` itself for ``--rounds`` rounds: the
sampler, the users' batches, their training, the upload and the aggregate, all of it.

- ``1000 x 60``: 100 of 1,000 users of 60 samples (all of MNIST's 60,000), against ``bound 6000``: ONE
  MLP trained with SGD on 100 x 32 samples per step for the steps of a user's epoch (2), the same
  arithmetic in a single model: the floor for any way of training the users;
- ``10000 x 6``: 100 of 10,000 users of 6 samples, against ``bound 600`` (one step of 600);
- ``1000 x 6``: 100 of 1,000 users of 6 samples (6,000 of MNIST's samples): the same work per round
  as ``10000 x 6`` with a tenth of the users, so that ``10000 x 6 / 1000 x 6`` is what the number of
  users costs a round.

Times are per round, best of ``--repeats`` runs of ``--rounds`` rounds, the cases timed in turns in one
process (ratios measured side by side). Targets: ``ours / bound <= 1.3`` and
``10000 x 6 / 1000 x 6 <= 1.1``. Peak memory of each case, in a fresh process of its own
(``--memory-case``): how far its resident set rises, while the rounds run, above what it held with
MNIST loaded and the users split (Linux's ``VmHWM``, reset through ``/proc/self/clear_refs``).

Data: MNIST from ``$AUROR_DATA_DIR`` (default ``../shared/datasets``), random data of its shape otherwise.
Run: ``.venv/bin/python benchmarks/bench_cross_device.py`` (``--help``; ``--rounds 2 --repeats 1
--no-memory`` is a smoke run; ``--glibc-malloc-defaults``: without the loop's ``keep_freed_memory``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks share their helpers
from bench_round import interleaved_times, load_mnist  # noqa: E402

import pipeline.core.device as device  # noqa: E402
from lightning_modules.mlp import MLPClassifier  # noqa: E402
from pipeline.attacks.label_flip import LabelFlip  # noqa: E402
from pipeline.core.loop import CollaborativeLoop, UserBehaviour  # noqa: E402

CASES = {"1000 x 60": (1000, 60), "10000 x 6": (10000, 6), "1000 x 6": (1000, 6)}
PER_ROUND, BATCH = 100, 32


def make_case(x: torch.Tensor, y: torch.Tensor, num_users: int, samples: int, rounds: int, seed: int):
    """A function running ``rounds`` rounds of a fresh loop of ``num_users`` users of ``samples`` each."""
    data = SimpleNamespace(train_x=x[: num_users * samples], train_y=y[: num_users * samples],
                           test_x=x[:100], test_y=y[:100], root_indices=torch.zeros(0, dtype=torch.long),
                           user_indices=list(torch.arange(num_users * samples).split(samples)),
                           malicious=torch.zeros(num_users, dtype=torch.bool))
    behaviour = UserBehaviour(epochs=[1] * num_users, lr_multipliers=torch.ones(num_users),
                              update_scale=torch.ones(num_users), attackers=torch.zeros(num_users, dtype=torch.bool))
    attack = LabelFlip(LabelFlip.Params(), SimpleNamespace(source_class=1, target_class=7, poisoned_fraction=1.0))

    def run() -> None:
        torch.manual_seed(seed)
        module = MLPClassifier(x.shape[1], 10, hidden_sizes=[128, 64], lr=0.1)
        CollaborativeLoop(module, data, behaviour, rounds, BATCH, seed, attack, per_round=PER_ROUND,
                          eval_every=rounds + 1).run()

    return run


def make_bound(x: torch.Tensor, y: torch.Tensor, samples: int, rounds: int, seed: int):
    """ONE model, ``rounds`` rounds of a user's steps on batches of 100 x 32 (the last step: 100 x the rest)."""
    steps = [min(BATCH, samples - s) for s in range(0, samples, BATCH)]
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(y), (PER_ROUND * b,), generator=g) for b in steps]
    torch.manual_seed(seed)
    template = MLPClassifier(x.shape[1], 10, hidden_sizes=[128, 64], lr=0.1)
    start = parameters_to_vector(template.parameters()).detach().clone()

    def run() -> None:
        vector_to_parameters(start.clone(), template.parameters())
        optimizer = template.make_optimizer(template.parameters())
        for _ in range(rounds):
            for idx in batches:
                optimizer.zero_grad()
                template.loss(template(x[idx]), y[idx]).backward()
                optimizer.step()

    return run


def status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc/self/status, in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def peak_mib(case: str, rounds: int, seed: int) -> float:
    """How far above what it held with MNIST loaded a fresh process's resident set peaks while it runs ``case``."""
    args = [sys.executable, __file__, "--memory-case", case, "--rounds", str(rounds), "--seed", str(seed),
            *(["--glibc-malloc-defaults"] if device._allocator_kept is False else [])]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak MiB"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="leave glibc's malloc as it is (the loop's keep_freed_memory skipped): what it saves")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.glibc_malloc_defaults:
        device._allocator_kept = False  # as if applied already
    torch.set_num_threads(torch.get_num_threads())
    x, y, note = load_mnist(60_000, args.seed)
    if args.memory_case:
        run = make_case(x, y, *CASES[args.memory_case], args.rounds, args.seed)
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident now
        before = status_mib("VmRSS")
        run()
        print(json.dumps({"peak MiB": status_mib("VmHWM") - before}))
        return {}
    print(f"data: {note}")
    print(f"setting: {PER_ROUND} users per round, 1 epoch, batch {BATCH}, MLP 784-128-64-10 tanh, SGD lr 0.1, "
          f"plain mean; {args.rounds} rounds per run, best of {args.repeats}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    candidates = {name: make_case(x, y, *shape, args.rounds, args.seed) for name, shape in CASES.items()}
    candidates |= {f"bound {PER_ROUND * n}": make_bound(x, y, n, args.rounds, args.seed) for n in (60, 6)}
    times = interleaved_times(candidates, {name: args.repeats for name in candidates})
    per_round = {name: best / args.rounds for name, (best, _) in times.items()}
    memory = {} if args.no_memory else {name: peak_mib(name, args.rounds, args.seed) for name in CASES}
    print(f"{'':12s} {'ms/round':>9s} {'peak MiB':>9s}  (peak: the resident set's rise above MNIST loaded)")
    for name, t in per_round.items():
        print(f"{name:12s} {1000 * t:9.1f} {memory.get(name, math.nan):9.0f}")
    ratios = {
        "1000 x 60 / bound": per_round["1000 x 60"] / per_round["bound 6000"],
        "10000 x 6 / bound": per_round["10000 x 6"] / per_round["bound 600"],
        "10000 x 6 / 1000 x 6": per_round["10000 x 6"] / per_round["1000 x 6"],
    }
    print(f"ratio 100 of 1,000 (60 each) / bound      {ratios['1000 x 60 / bound']:6.2f}   (target <= 1.3)")
    print(f"ratio 100 of 10,000 (6 each) / bound      {ratios['10000 x 6 / bound']:6.2f}   (target <= 1.3)")
    print(f"ratio 10,000 users / 1,000 users (6 each) {ratios['10000 x 6 / 1000 x 6']:6.2f}   (target <= 1.1)")
    return {**ratios, **{f"peak MiB {k}": v for k, v in memory.items()}}


if __name__ == "__main__":
    main()
