"""Benchmark: AUROR's per-feature 2-means, exact and vectorised, vs scikit-learn.

For each size -- (a) 30 users x 669,706 features (a 784-512-512-10 MLP) and
(b) 30 users x 109,386 features (the default MNIST MLP, 784-128-64-10) --
on random updates (standard normal, 6 of the 30 users shifted on a quarter
of the features so that there is something to find):

- time ``pipeline.defenses.clustering.two_means_1d`` (the clustering alone) and
  ``pipeline.defenses.auror.Auror.fit`` (clustering + indicative features + scores),
  warmed up once, best of ``--repeats``; also ``two_means_1d`` when half of
  the values are missing (NaN, as when users upload half of their update);
- time a per-feature loop of scikit-learn ``KMeans(n_clusters=2, n_init=1)``
  (its cheapest setting) on a random sample of ``--sample`` features and
  extrapolate to all features; print the ratio (target for (a): >= 1000x,
  and ours <= 2 s);
- check on that sample that our partition agrees with scikit-learn's
  best-of-10 (``n_init=10``): the same partition, or ours has a lower
  within-cluster sum of squares (never a higher one);
- measure the peak extra memory of ``two_means_1d`` and of ``Auror.fit``
  relative to the size of the float32 update matrix (target: <= 4x).

Memory method: each measurement runs in a fresh subprocess that builds the
update matrix (without large temporaries), warms the code up on a small
slice, resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``),
reads its resident set size (``VmRSS`` in ``/proc/self/status``) just before
the call and the peak resident set size (``VmHWM``) just after. ``peak -
resident before`` covers every allocation (torch, NumPy, thread stacks) and
is reported as a multiple of ``users x features x 4`` bytes. (Where the mark
cannot be reset, the figure is an upper bound; ``getrusage``'s ``ru_maxrss``
is not used: it survives ``fork``/``exec`` and reports the parent's peak.)

Ratios measured in the same run are what to compare: absolute times drift
on a shared machine.

Run: ``.venv/bin/python benchmarks/bench_clustering.py`` (``--help`` for
options; ``--sizes 2000 --sample 20 --repeats 1`` is a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

import numpy as np
import torch
from sklearn.cluster import KMeans

from lightning_modules.mlp import MLPClassifier
from pipeline.defenses.auror import Auror
from pipeline.defenses.clustering import two_means_1d


def mlp_size(hidden: list[int]) -> int:
    return sum(p.numel() for p in MLPClassifier(784, 10, hidden_sizes=hidden).parameters())


def make_updates(num_users: int, num_features: int, seed: int, missing: float = 0.0) -> torch.Tensor:
    """``(users, features)`` float32: N(0, 1), a minority of users shifted on a quarter of the
    features, a fraction ``missing`` of NaN; built row by row (no matrix-sized temporaries)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(num_users, num_features, generator=g)
    planted = num_features // 4
    shift = torch.rand(planted, generator=g) * 3.5 + 0.5
    for user in range(max(1, num_users // 5)):
        values[user, :planted] += shift
    if missing:
        for user in range(num_users):
            values[user][torch.rand(num_features, generator=g) < missing] = float("nan")
    return values


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sse(x: np.ndarray, upper: np.ndarray) -> float:
    return float(sum(((x[m] - x[m].mean()) ** 2).sum() for m in (upper, ~upper) if m.any()))


def status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def memory_probe(what: str, num_users: int, num_features: int, missing: float) -> dict[str, float]:
    """Run in a fresh process: peak extra memory of one call, relative to the matrix size."""
    values = make_updates(num_users, num_features, seed=1, missing=missing)
    small = values[:, :5000].clone()
    call = (lambda v: two_means_1d(v.T)) if what == "two_means_1d" else (lambda v: Auror().fit(v))
    call(small)  # load code, start thread pools
    del small
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
        exact = True
    except OSError:
        exact = False
    before = status_bytes("VmRSS")
    result = call(values)
    peak = status_bytes("VmHWM")
    del result
    matrix = values.numel() * values.element_size()
    return {"matrix_mb": matrix / 2**20, "extra_mb": (peak - before) / 2**20, "ratio": (peak - before) / matrix,
            "exact": exact}


def measure_memory(what: str, num_users: int, num_features: int, missing: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", what, str(num_users), str(num_features), str(missing)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_size(label: str, num_users: int, num_features: int, args) -> dict[str, float]:
    print(f"\n({label}) {num_users} users x {num_features:,} features "
          f"({num_users * num_features * 4 / 2**20:.1f} MiB of float32 updates)")
    values = make_updates(num_users, num_features, seed=args.seed)
    with_missing = make_updates(num_users, num_features, seed=args.seed, missing=0.5)

    ours = best_time(lambda: two_means_1d(values.T), args.repeats)
    ours_missing = best_time(lambda: two_means_1d(with_missing.T), args.repeats)
    auror = best_time(lambda: Auror().fit(values), args.repeats)
    result = two_means_1d(values.T)

    rng = np.random.default_rng(args.seed)
    sample = rng.choice(num_features, size=min(args.sample, num_features), replace=False)
    columns = values[:, sample].double().numpy().T  # (sample, users) float64
    start = time.perf_counter()
    for x in columns:
        KMeans(n_clusters=2, n_init=1, random_state=0).fit(x[:, None])
    per_feature = (time.perf_counter() - start) / len(sample)
    sklearn_all = per_feature * num_features

    same = better = worse = 0
    for f, x in zip(sample, columns):
        reference = KMeans(n_clusters=2, n_init=10, random_state=0).fit(x[:, None]).labels_.astype(bool)
        upper = result.upper[f].numpy()
        if (upper == reference).all() or (upper == ~reference).all():
            same += 1
        elif sse(x, upper) <= sse(x, reference) + 1e-9 * max(1.0, float((x**2).sum())):
            better += 1
        else:
            worse += 1

    target = "   (target <= 2 s for (a))" if label == "a" else ""
    print(f"  two_means_1d (clustering only)        {ours:8.3f} s{target}")
    print(f"  two_means_1d, 50% values missing      {ours_missing:8.3f} s")
    print(f"  Auror.fit (clustering + scores)       {auror:8.3f} s")
    print(f"  sklearn KMeans(n_init=1) per feature  {per_feature * 1e3:8.3f} ms, "
          f"x {num_features:,} features = {sklearn_all:,.0f} s (extrapolated from {len(sample)})")
    target = "  (target >= 1000x for (a))" if label == "a" else ""
    print(f"  ratio sklearn loop / two_means_1d     {sklearn_all / ours:8.0f}x{target}")
    print(f"  ratio sklearn loop / Auror.fit        {sklearn_all / auror:8.0f}x")
    print(f"  agreement with KMeans(n_init=10) on {len(sample)} features: same partition {same}, "
          f"ours lower SSE {better}, ours higher SSE {worse} (must be 0)")
    figures = {"ours": ours, "ratio": sklearn_all / ours, "worse": worse}
    if not args.no_memory:
        for what, missing in (("two_means_1d", 0.0), ("two_means_1d", 0.5), ("Auror.fit", 0.0)):
            m = measure_memory(what, num_users, num_features, missing)
            note = f", {missing:.0%} missing" if missing else ""
            bound = "" if m["exact"] else ", upper bound"
            print(f"  peak extra memory, {what}{note}: {m['extra_mb']:.1f} MiB = {m['ratio']:.2f}x the "
                  f"{m['matrix_mb']:.1f} MiB matrix (target <= 4x{bound})")
            figures[f"memory {what}{note}"] = m["ratio"]
    return figures


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="numbers of features (default: the 784-512-512-10 and 784-128-64-10 MLPs)")
    parser.add_argument("--sample", type=int, default=200, help="features timed with scikit-learn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    args = parser.parse_args(argv)
    sizes = args.sizes or [mlp_size([512, 512]), mlp_size([128, 64])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; numpy {np.__version__}")
    return [bench_size(chr(ord("a") + i), args.users, n, args) for i, n in enumerate(sizes)]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        what, users, features, missing = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        print(json.dumps(memory_probe(what, users, features, missing)))
    else:
        main()
