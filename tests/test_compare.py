"""`auror compare`: every defense against every attack on the same cells, resumable, the report from finished cells."""

import json

import pytest

import pipeline.experiment.compare as compare
import pipeline.experiment.run as run_module
from pipeline.experiment.compare import MATRIX_SETTINGS, SETTINGS, load_cells, run_compare
from pipeline.experiment.config import ConfigError
from tests.conftest import TINY


@pytest.fixture
def overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "DEFAULT_STORAGE", f"sqlite:///{tmp_path}/sweeps.db")
    return [*TINY, f"tracking.reports_dir={tmp_path}/reports"]


def count_runs(monkeypatch) -> list[tuple[str, ...]]:
    calls, real = [], run_module.run_experiment

    def counted(cfg, seeds=None, track=True, arms=(), resume=None):
        calls.append((tuple(arms), cfg.users.partition, cfg.users.malicious_fraction, cfg.seed, cfg.attack.name))
        return real(cfg, seeds, track=track, arms=arms, resume=resume)

    monkeypatch.setattr(run_module, "run_experiment", counted)
    return calls


def test_compare_runs_each_cell_once_shares_benign_and_resumes(tmp_path, overrides, monkeypatch):
    calls = count_runs(monkeypatch)
    arms = ["benign", "attack", "median"]
    md = run_compare(None, overrides, [0], arms, "auror compare (test)", track=False, attacks=["label_flip"])
    # benign once for the IID settings (they differ only in who attacks), once for Dirichlet
    assert sum(c[0] == ("benign",) for c in calls) == 2
    assert sum(c[0] == ("attack",) for c in calls) == sum(c[0] == ("median",) for c in calls) == len(SETTINGS)
    root = tmp_path / "reports" / "compare" / "digits" / "label_flip"
    assert all(set(load_cells(root, arm)) == {s.label for s in SETTINGS} for arm in arms)

    table = json.loads(md.with_suffix(".json").read_text())
    for label in (s.label for s in SETTINGS):
        benign = load_cells(root, "benign")[label]["0"]["accuracy"]
        median = table["label_flip"]["median"][label]
        assert median["accuracy_drop"] == pytest.approx(benign - median["accuracy"])
        assert median["detection_rate"] is None  # a robust aggregator flags nobody
    assert "| median |" in md.read_text() and md.with_suffix(".png").stat().st_size > 0

    calls.clear()  # a second invocation finds every cell finished
    run_compare(None, overrides, [0], arms, "auror compare (test)", track=False, attacks=["label_flip"])
    assert calls == []


def test_the_attack_matrix_shares_benign_cells_that_measure_the_same_success(tmp_path, overrides, monkeypatch):
    calls = count_runs(monkeypatch)
    md = run_compare(None, overrides, [0], ["benign", "attack"], "c", track=False,
                     attacks=["ipm", "min_max", "backdoor"])
    # every other attack runs IID 30% and Dirichlet(0.5) 30%
    assert sorted(c[4] for c in calls if c[0] == ("attack",)) == ["backdoor"] * 2 + ["ipm"] * 2 + ["min_max"] * 2
    # one benign run per partition for the untargeted ones (success: the accuracy drop), one for the backdoor
    assert len([c for c in calls if c[0] == ("benign",)]) == 4
    table = json.loads(md.with_suffix(".json").read_text())
    assert list(table) == ["backdoor", "ipm", "min_max"]
    for attack in ("ipm", "min_max"):
        assert set(table[attack]["attack"]) == {s.label for s in MATRIX_SETTINGS}
        assert table[attack]["attack"]["IID 30%"]["attack_success_rate"] is None  # untargeted: AD is its success
    assert table["backdoor"]["benign"]["IID 30%"]["attack_success_rate"] < 0.2
    text = md.read_text()
    assert "## ipm (untargeted: success is AD)" in text and "## backdoor (backdoor, target 7)" in text


def test_an_unknown_attack_is_refused(overrides):
    with pytest.raises(ConfigError, match="^--attacks: must be registered attacks"):
        run_compare(None, overrides, [0], None, "c", attacks=["sybil"])


def test_a_new_defense_only_runs_its_own_cells(tmp_path, overrides, monkeypatch):
    calls = count_runs(monkeypatch)
    run_compare(None, overrides, [0], ["benign", "attack"], "c", track=False, attacks=["label_flip"])
    calls.clear()
    md = run_compare(None, overrides, [0], ["benign", "attack", "krum"], "c", track=False, attacks=["label_flip"])
    assert {c[0] for c in calls} == {("krum",)}
    assert "| krum |" in md.read_text()


def test_report_only_without_cells_is_refused(overrides):
    with pytest.raises(ConfigError, match="--report-only: no arm has finished cells"):
        run_compare(None, overrides, [0], None, "c", report_only=True)
