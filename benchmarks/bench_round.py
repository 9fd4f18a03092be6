"""Benchmark: one round of local training, all users together vs the alternatives.

Setting (the issue's): 30 users x 2,000 MNIST samples each, one local epoch,
batch 32, the paper's MNIST MLP 784-128-64-10 with tanh, plain SGD from the
module's ``make_optimizer``. Every user starts from the same global model.

Timed, each warmed up once, then in turns (bound, ours, ..., bound, ours,
...) so that load from other processes hits all alike; the best of
``--repeats`` runs is compared (the median is printed too):

- ``ours``: ``user_batches`` + ``train_users`` (every user trained at once on
  stacked weights);
- ``bound``: ONE ``MLPClassifier`` trained with SGD on the union of the
  users' data with batch ``users x 32`` = 960, for the same number of steps
  as a user's epoch (``ceil(2000 / 32)`` = 63): the same arithmetic as
  ``ours`` in a single model, the floor for any way of training the users;
- ``plain loop``: each user's model trained in turn by a plain PyTorch loop
  over the same schedule (context);
- ``trainer loop``: each user fitted in turn by a plain
  ``pytorch_lightning.Trainer(max_epochs=1, ...).fit`` on a ``DataLoader`` of
  batch 32 (fewer repeats: it is the slow one).

Ratios measured in the same run are what to compare (the machine may be
shared): targets ``ours / bound <= 1.5`` and ``trainer loop / ours >= 4``.

Data: MNIST from ``$AUROR_DATA_DIR`` (default ``../shared/datasets`` next to
the repository), read with ``torchvision.datasets.MNIST(root, download=False)``;
when it is absent, random data of the same shape is used (timings do not
depend on pixel values) and a note says so.

Run: ``.venv/bin/python benchmarks/bench_round.py`` (``--help`` for options;
``--users 3 --samples 64 --repeats 1 --trainer-repeats 1`` is a smoke run;
``--device cuda`` times the same on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.mlp import MLPClassifier
from pipeline.experiment.config import ConfigError
from pipeline.core.local_training import train_users, user_batches
from pipeline.core.device import describe_device, select_device

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def load_mnist(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``num_samples`` MNIST training images as float32 ``(n, 784)`` in [0, 1], labels, and a note."""
    root = Path(os.environ.get("AUROR_DATA_DIR", DEFAULT_DATA_DIR))
    g = torch.Generator().manual_seed(seed)
    try:
        from torchvision.datasets import MNIST

        mnist = MNIST(root=str(root), train=True, download=False)
        if num_samples > len(mnist.targets):
            raise ValueError(f"MNIST has {len(mnist.targets)} training samples, {num_samples} asked for")
        pick = torch.randperm(len(mnist.targets), generator=g)[:num_samples]
        x = mnist.data[pick].reshape(num_samples, -1).float().div_(255)
        return x, mnist.targets[pick].long(), f"MNIST from {root}"
    except (RuntimeError, OSError, ImportError) as error:  # torchvision says "Dataset not found" as RuntimeError
        x = torch.rand(num_samples, 28 * 28, generator=g)
        y = torch.randint(0, 10, (num_samples,), generator=g)
        return x, y, f"NOTE: MNIST not found under {root} ({type(error).__name__}); random data of the same shape"


def interleaved_times(candidates: dict, repeats: dict[str, int],
                      device: torch.device = torch.device("cpu")) -> dict[str, tuple[float, float]]:
    """Warm every candidate up once, then time them in turns (so that a burst of load
    on a shared machine hits all of them alike): ``{name: (best, median)}`` seconds.
    On CUDA each time waits for the GPU to finish."""
    def done() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in candidates.values():
        fn()
    done()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for turn in range(max(repeats.values())):
        for name, fn in candidates.items():
            if turn < repeats[name]:
                start = time.perf_counter()
                fn()
                done()
                times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def fresh_module(template: MLPClassifier, flat: torch.Tensor) -> MLPClassifier:
    module = copy.deepcopy(template)
    vector_to_parameters(flat.clone(), module.parameters())
    return module


def parse_with_device(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """Add ``--device`` to a benchmark's ``parser``, parse ``argv``, and return the arguments and the device
    (a device that is not there is argparse's one-line error)."""
    parser.add_argument("--device", default="cpu", help="cpu (the README's figures), cuda, cuda:N or auto")
    args = parser.parse_args(argv)
    try:
        return args, select_device(args.device, key="--device")
    except ConfigError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--samples", type=int, default=2000, help="samples per user")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trainer-repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args, device = parse_with_device(parser, argv)

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")

    import pytorch_lightning as pl

    U, n, B = args.users, args.samples, args.batch_size
    x, y, note = load_mnist(U * n, args.seed)
    x, y = x.to(device), y.to(device)
    user_indices = list(torch.arange(U * n).split(n))
    steps = math.ceil(n / B)
    torch.manual_seed(args.seed)
    template = MLPClassifier(x.shape[1], 10, hidden_sizes=args.hidden, lr=args.lr).to(device)
    global_params = parameters_to_vector(template.parameters()).detach().clone()
    ones = torch.ones(U)
    print(f"data: {note}")
    print(f"setting: {U} users x {n} samples, 1 epoch, batch {B} ({steps} steps), "
          f"MLP {x.shape[1]}-{'-'.join(map(str, args.hidden))}-10 tanh, SGD lr {args.lr}; "
          f"torch {torch.__version__}, {describe_device(device)}")

    round_counter = iter(range(1, 10**6))

    def ours() -> torch.Tensor:
        schedule = user_batches(user_indices, [1] * U, B, args.seed, next(round_counter))
        return train_users(template, global_params, x, y, schedule, ones)

    schedule_fixed = user_batches(user_indices, [1] * U, B, args.seed, 0)

    def ours_train_only() -> torch.Tensor:
        return train_users(template, global_params, x, y, schedule_fixed, ones)

    union_order = torch.randperm(U * n, generator=torch.Generator().manual_seed(args.seed))
    union_batches = union_order.repeat(math.ceil(steps * U * B / (U * n)))[: steps * U * B].view(steps, U * B)
    union_batches = union_batches.to(device)

    def bound() -> None:
        module = fresh_module(template, global_params)
        optimizer = module.make_optimizer(module.parameters())
        for idx in union_batches:
            optimizer.zero_grad()
            module.loss(module(x[idx]), y[idx]).backward()
            optimizer.step()

    def plain_loop() -> None:
        for user in range(U):
            module = fresh_module(template, global_params)
            optimizer = module.make_optimizer(module.parameters())
            for batch in schedule_fixed[:, user]:
                batch = batch[batch >= 0].to(device)
                optimizer.zero_grad()
                module.loss(module(x[batch]), y[batch]).backward()
                optimizer.step()

    def trainer_loop() -> None:
        for indices in user_indices:
            module = fresh_module(template, global_params)
            loader = DataLoader(TensorDataset(x[indices], y[indices]), batch_size=B, shuffle=True)
            trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, accelerator="gpu" if device.type == "cuda" else "cpu",
                                 devices=[device.index or 0] if device.type == "cuda" else "auto")
            trainer.fit(module, loader)

    candidates = {
        "bound": bound, "ours": ours, "ours (train_users only)": ours_train_only,
        "plain loop": plain_loop, "trainer loop": trainer_loop,
    }
    repeats = {name: args.trainer_repeats if name == "trainer loop" else args.repeats for name in candidates}
    times = interleaved_times(candidates, repeats, device)
    print(f"{'':28s} {'best s':>8s} {'median s':>9s}")
    for name, (best, median) in times.items():
        print(f"{name:28s} {best:8.3f} {median:9.3f}")
    best = {name: t[0] for name, t in times.items()}
    ratios = {
        "ours / bound": best["ours"] / best["bound"],
        "trainer loop / ours": best["trainer loop"] / best["ours"],
        "plain loop / ours": best["plain loop"] / best["ours"],
    }
    print(f"ratio ours / bound           {ratios['ours / bound']:6.2f}   (target <= 1.5)")
    print(f"ratio trainer loop / ours    {ratios['trainer loop / ours']:6.2f}   (target >= 4)")
    print(f"ratio plain loop / ours      {ratios['plain loop / ours']:6.2f}")
    return ratios


if __name__ == "__main__":
    main()
