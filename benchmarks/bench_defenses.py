"""Benchmark: every defense's server step against one round of local training.

Settings (the issue's), each timed in one run:

- 30 users x 2,000 MNIST samples, the paper's MLP 784-128-64-10 (109,386
  parameters): the target is every defense's step <= 10% of the round;
- 100 users x 600 samples, MLP 784-512-512-10 (669,706 parameters): reported.

The round is ``user_batches`` + ``train_users`` (one local epoch, batch 32);
the updates the defenses aggregate are that round's real updates. A defense's
step is one ``aggregate`` call on a fresh instance with its default
parameters, in the round where it does the most work: AUROR and ``auror_guard``
with ``window_rounds=1`` (they cluster every parameter and vote in that call),
FLPoison's AUROR in a round where it finds its indicative features, FoolsGold
with its history, FLTrust with the server's root update already computed
(training on its 100 root samples costs another ~1/600 of the round and is
not timed), FLAME with HDBSCAN and noise.

Timed, each warmed up once, then in turns (the round, then every defense,
repeated), the best of ``--repeats`` compared; the ratios are measured in the
same run (the machine may be shared). ``--device cuda`` times it on a GPU.
Data: MNIST from ``$AUROR_DATA_DIR`` (default ``../shared/datasets``), else
random data of the same shape (timings do not depend on pixel values).

Run: ``.venv/bin/python benchmarks/bench_defenses.py`` (``--sizes 30x2000:128,64``
for one size; ``--sizes 4x50:8 --repeats 1`` is a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks share their helpers
from bench_round import interleaved_times, load_mnist, parse_with_device  # noqa: E402

from lightning_modules.mlp import MLPClassifier  # noqa: E402
from pipeline.core.device import describe_device  # noqa: E402
from pipeline.core.local_training import moved_probabilities, train_users, user_batches  # noqa: E402
from pipeline.core.server import ServerInputs, Uploads, parameter_layout  # noqa: E402
from pipeline.defenses import REGISTRY  # noqa: E402
from pipeline.defenses.compose import defense_class  # noqa: E402

SIZES = ["30x2000:128,64", "100x600:512,512"]
TARGET = 0.10  # of one round, at the first size


def parse_size(text: str) -> tuple[int, int, list[int]]:
    """``"30x2000:128,64"`` -> 30 users, 2,000 samples each, hidden sizes [128, 64]."""
    users, _, rest = text.partition("x")
    samples, _, hidden = rest.partition(":")
    return int(users), int(samples), [int(h) for h in hidden.split(",")]


# every rule, and each pre-aggregator in front of the median (a pre-aggregator is an arm only composed)
TIMED = [*(name for name, d in REGISTRY.items() if not d.pre_aggregator),
         *(f"{name}+median" for name, d in REGISTRY.items() if d.pre_aggregator)]


def defense_step(name: str, updates: torch.Tensor, server: ServerInputs):
    """One server step of a fresh ``name`` defense (a composed one: ``<pre>+<rule>``) on ``updates`` (round 1)."""
    cls = defense_class(name)
    params = {part: REGISTRY[part].Params() for part in name.split("+")} if "+" in name else cls.Params()
    if name in ("auror", "auror_guard"):
        params = dataclasses.replace(params, window_rounds=1)  # detect in this very call
    uploads = Uploads(1, torch.arange(updates.shape[0], device=updates.device), updates)

    def step():
        return cls(params, server).aggregate(uploads).step

    return step


def bench_size(users: int, samples: int, hidden: list[int], repeats: int, device: torch.device,
               seed: int) -> dict[str, float]:
    x, y, note = load_mnist(users * samples, seed)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    module = MLPClassifier(x.shape[1], 10, hidden_sizes=hidden, lr=0.1).to(device)
    start = parameters_to_vector(module.parameters()).detach().clone()
    user_indices = list(torch.arange(users * samples).split(samples))
    ones = torch.ones(users)
    rounds = iter(range(1, 10**6))

    def local_round() -> torch.Tensor:
        schedule = user_batches(user_indices, [1] * users, 32, seed, next(rounds))
        return train_users(module, start, x, y, schedule, ones)

    updates = local_round() - start
    root = updates.mean(0)  # stands for the server's own update (FLTrust)
    server = ServerInputs(parameter_layout(module), seed, root_update=lambda round_: root,  # DeepSight's probes:
                          model_outputs=lambda u, probes: moved_probabilities(module, start, u, probes),
                          input_shape=tuple(x.shape[1:]))
    candidates = {"local round": local_round}
    candidates |= {name: defense_step(name, updates, server) for name in TIMED}
    print(f"\n{users} users x {samples} samples, MLP {x.shape[1]}-{'-'.join(map(str, hidden))}-10 "
          f"({start.numel():,} parameters); {note}")
    times = interleaved_times(candidates, {name: repeats for name in candidates}, device)
    round_s = times["local round"][0]
    print(f"{'':22s} {'best s':>9s} {'median s':>9s} {'/ round':>9s}")
    ratios = {}
    for name, (best, median) in times.items():
        ratios[name] = best / round_s
        print(f"{name:22s} {best:9.4f} {median:9.4f} {ratios[name]:9.3f}")
    del ratios["local round"]
    return ratios


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="USERSxSAMPLES:HIDDEN,... (default: both)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args, device = parse_with_device(parser, argv)
    print(f"torch {torch.__version__}, {describe_device(device)}")
    figures = {}
    for size in args.sizes:
        users, samples, hidden = parse_size(size)
        figures[size] = bench_size(users, samples, hidden, args.repeats, device, args.seed)
    first = figures[args.sizes[0]]
    worst = max(first, key=first.get)
    print(f"\nat {args.sizes[0]}: the slowest defense step, {worst}, is {first[worst]:.3f} x one round of local "
          f"training (target <= {TARGET}); {sum(r <= TARGET for r in first.values())} of {len(first)} within it")
    return figures


if __name__ == "__main__":
    main()
