"""Benchmark: one round of 30 convolutional users trained together, against one model on their batches.

For each model (``--models``; default all three):

- ``lenet5``: LeNet-5 on 28x28 grey images, 10 classes (Fashion-MNIST's and MNIST's CNN);
- ``cnn``: the GTSRB CNN on 32x32 RGB images, 43 classes;
- ``resnet8``: ResNet-8 with GroupNorm on 32x32 RGB images, 10 classes (GTSRB, CIFAR-10),

``--users`` users of ``--samples`` samples each run one local epoch with batch 32, plain SGD from the
module's ``make_optimizer``, every user from the same global model. Timed, each warmed up once, then in
turns (so that load from other processes hits all alike), best of ``--repeats``:

- ``ours``: ``user_batches`` + ``train_users`` (every user's convolutions in one grouped pass);
- ``bound``: ONE model trained with SGD on the union of the users' batches (users x 32 per step) for the
  steps of a user's epoch: the same arithmetic in a single model, the floor for any way of training
  the users. Timed with its images in both memory layouts (``NCHW`` and channels-last); the ratio is
  against the faster;
- ``one user at a time``: each user's model trained in turn by a plain PyTorch loop over the same
  batches (what training users one after the other costs).

Target: ``ours / bound <= 1.5`` for every model. Timings do not depend on pixel values, so the images
are random (seeded) of each model's input shape.

Run: ``.venv/bin/python benchmarks/bench_conv_round.py`` (``--help``; ``--users 2 --samples 16
--repeats 1`` is a smoke run; ``--device cuda`` times the same on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks share their helpers
from bench_round import interleaved_times, parse_with_device  # noqa: E402

from lightning_modules.cnn import CNNClassifier  # noqa: E402
from lightning_modules.lenet import LeNet5Classifier  # noqa: E402
from lightning_modules.resnet import ResNet8Classifier  # noqa: E402
from pipeline.core.device import describe_device  # noqa: E402
from pipeline.core.local_training import train_users, user_batches  # noqa: E402

MODELS = {  # name: (constructor, image shape, classes)
    "lenet5": (LeNet5Classifier, (1, 28, 28), 10),
    "cnn": (CNNClassifier, (3, 32, 32), 43),
    "resnet8": (ResNet8Classifier, (3, 32, 32), 10),
}


def time_model(name: str, users: int, samples: int, batch: int, repeats: int, seed: int,
               device: torch.device) -> dict[str, float]:
    """Best seconds of ``ours``, ``bound`` (each layout) and ``one user at a time`` for one model."""
    make, shape, classes = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(users * samples, *shape, generator=g).to(device)
    y = torch.randint(0, classes, (users * samples,), generator=g).to(device)
    torch.manual_seed(seed)
    template = make(classes, input_shape=shape).to(device)
    start = parameters_to_vector(template.parameters()).detach().clone()
    user_indices = list(torch.arange(users * samples).split(samples))
    schedule = user_batches(user_indices, [1] * users, batch, seed, 1)
    steps = schedule.shape[0]
    union = torch.randperm(users * samples, generator=g)
    union = union.repeat(math.ceil(steps * users * batch / len(union)))[: steps * users * batch]
    union = union.view(steps, users * batch).to(device)

    def fresh():
        module = copy.deepcopy(template)
        vector_to_parameters(start.clone(), module.parameters())
        return module

    def ours() -> None:
        train_users(template, start, x, y, schedule, torch.ones(users))

    def bound(layout: torch.memory_format) -> None:
        module = fresh().to(memory_format=layout)
        optimizer = module.make_optimizer(module.parameters())
        for idx in union:
            optimizer.zero_grad()
            module.loss(module(x[idx].contiguous(memory_format=layout)), y[idx]).backward()
            optimizer.step()

    def one_at_a_time() -> None:
        for user in range(users):
            module = fresh()
            optimizer = module.make_optimizer(module.parameters())
            for idx in schedule[:, user]:
                idx = idx[idx >= 0].to(device)
                optimizer.zero_grad()
                module.loss(module(x[idx]), y[idx]).backward()
                optimizer.step()

    candidates = {"bound NCHW": lambda: bound(torch.contiguous_format),
                  "bound channels-last": lambda: bound(torch.channels_last),
                  "ours": ours, "one user at a time": one_at_a_time}
    times = interleaved_times(candidates, dict.fromkeys(candidates, repeats), device)
    return {label: best for label, (best, _) in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--samples", type=int, default=256, help="samples per user (256: 8 steps of 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args, device = parse_with_device(parser, argv)
    steps = math.ceil(args.samples / args.batch_size)
    print(f"setting: {args.users} users x {args.samples} samples, 1 epoch, batch {args.batch_size} ({steps} steps), "
          f"plain SGD; random images; torch {torch.__version__}, {describe_device(device)}")
    print(f"{'model':8s} {'ours s':>8s} {'bound s':>8s} {'(layout)':>14s} {'1 at a time s':>14s} "
          f"{'ours/bound':>11s} {'1 at a time/ours':>17s}")
    ratios = {}
    for name in args.models:
        t = time_model(name, args.users, args.samples, args.batch_size, args.repeats, args.seed, device)
        layout = min(("bound NCHW", "bound channels-last"), key=t.get)
        ratios[f"{name} ours / bound"] = t["ours"] / t[layout]
        ratios[f"{name} one user at a time / ours"] = t["one user at a time"] / t["ours"]
        print(f"{name:8s} {t['ours']:8.3f} {t[layout]:8.3f} {layout[6:]:>14s} {t['one user at a time']:14.3f} "
              f"{ratios[f'{name} ours / bound']:11.2f} {ratios[f'{name} one user at a time / ours']:17.2f}")
    print("target: ours / bound <= 1.5 for every model")
    return ratios


if __name__ == "__main__":
    main()
