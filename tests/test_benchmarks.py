"""The benchmark scripts run end to end on a tiny size (no timing is asserted)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clustering_benchmark_runs_and_never_loses_to_sklearn(capsys):
    (figures,) = load("bench_clustering").main(
        ["--sizes", "500", "--users", "7", "--sample", "5", "--repeats", "1", "--no-memory"])
    assert figures["worse"] == 0
    assert "ratio sklearn loop / two_means_1d" in capsys.readouterr().out


def test_round_benchmark_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AUROR_DATA_DIR", str(tmp_path))  # no data there: the random fallback
    ratios = load("bench_round").main(
        ["--users", "2", "--samples", "40", "--hidden", "8", "--repeats", "1", "--trainer-repeats", "1"])
    assert set(ratios) == {"ours / bound", "trainer loop / ours", "plain loop / ours"}
    assert all(r > 0 for r in ratios.values())
    assert "NOTE: MNIST not found" in capsys.readouterr().out


@pytest.mark.manual
def test_clustering_memory_probe_runs():
    figures = load("bench_clustering").measure_memory("two_means_1d", 30, 200_000, 0.5)
    assert figures["ratio"] < 4


@pytest.mark.slow
def test_end_to_end_benchmark_times_every_arm(capsys):
    from tests.conftest import TINY

    params = str(BENCHMARKS.parent / "params.yaml")  # the embedded digits: no data needed
    figures = load("bench_end_to_end").main(["--params", params, *(a for o in TINY for a in ("--set", o))])
    assert set(figures) == {"wall s", "peak MiB", "benign arm s", "attack arm s", "auror arm s", "bound s",
                            "wall / bound", "torch import s", "beyond bound and torch s"}
    assert figures["wall s"] > sum(figures[f"{arm} arm s"] for arm in ("benign", "attack", "auror")) > 0
    assert figures["wall s"] > figures["bound s"] > 0 and figures["wall / bound"] > 1
    assert figures["peak MiB"] > 50
    out = capsys.readouterr().out
    assert "x the 120 s target" in out and "whole process / compute bound" in out


def test_defenses_benchmark_times_every_registered_defense(capsys, monkeypatch, tmp_path):
    from pipeline.defenses import REGISTRY

    monkeypatch.setenv("AUROR_DATA_DIR", str(tmp_path))  # the random fallback
    figures = load("bench_defenses").main(["--sizes", "4x50:8", "--repeats", "1"])
    (ratios,) = figures.values()
    rules = {n for n, d in REGISTRY.items() if not d.pre_aggregator}
    assert set(ratios) == rules | {"nnm+median", "bucketing+median"} and all(r > 0 for r in ratios.values())
    assert "x one round of local training (target <= 0.1)" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_benchmark_runs_one_and_two_workers(capsys):
    from tests.conftest import TINY

    params = str(BENCHMARKS.parent / "params.yaml")
    results = load("bench_sweep").main(["--params", params, "--grid", "users.malicious_fraction=0.2,0.4",
                                        "--arms", "attack", *(a for o in TINY for a in ("--set", o))])
    assert [(r["workers"], r["cells"]) for r in results] == [(1, 2), (2, 2)]  # every cell once in each sweep
    assert all(0 < r["share"] < 1 for r in results)
    assert "cells per hour, 2 workers over 1" in capsys.readouterr().out


def test_startup_benchmark_runs(capsys):
    times = load("bench_startup").main(["--repeats", "1"])
    assert set(times) >= {'python -c "import torch"', "auror defenses", "auror run --arms bogus"}
    assert "x the torch import" in capsys.readouterr().out


def test_auror_guard_benchmark_times_both_arms_and_the_recovery(capsys, monkeypatch):
    from tests.conftest import TINY

    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    figures = load("bench_auror_guard").main(
        ["--params", str(BENCHMARKS.parent / "params.yaml"), *(a for o in TINY for a in ("--set", o)),
         "--set", "defense.auror_guard.window_rounds=2", "--set", "defense.auror_guard.redetect_every=2"])
    assert figures["attack"] > 0 and figures["auror_guard"] > 0 and figures["rounds_retrained"] >= 2
    assert "x the undefended arm (goal <= 1.2)" in capsys.readouterr().out


def test_cross_device_benchmark_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AUROR_DATA_DIR", str(tmp_path))  # the random fallback
    figures = load("bench_cross_device").main(["--rounds", "1", "--repeats", "1", "--no-memory"])
    assert set(figures) == {"1000 x 60 / bound", "10000 x 6 / bound", "10000 x 6 / 1000 x 6"}
    assert all(r > 0 for r in figures.values())
    assert "ratio 10,000 users / 1,000 users" in capsys.readouterr().out


def test_convolutional_round_benchmark_times_every_model(capsys):
    ratios = load("bench_conv_round").main(["--users", "2", "--samples", "16", "--repeats", "1"])
    assert set(ratios) == {f"{m} {r}" for m in ("lenet5", "cnn", "resnet8")
                           for r in ("ours / bound", "one user at a time / ours")}
    assert all(r > 0 for r in ratios.values())
    assert "target: ours / bound <= 1.5" in capsys.readouterr().out
