"""`auror compare`: every defense against every attack on the same cells, keyed by config, resumable, the
report a view over the results store."""

import json
import os

import pytest

import pipeline.experiment.queue as queue
from pipeline.experiment.cli import main
from pipeline.experiment.compare import compare_grid
from pipeline.experiment.config import ConfigError, load_config
from pipeline.experiment.grid import COMPARE_SETTINGS, MATRIX_SETTINGS
from tests.conftest import TINY


@pytest.fixture
def base(tmp_path):
    return load_config(None, [*TINY, f"tracking.reports_dir={tmp_path}/reports"])


def run(grid, tmp_path):
    grid.run(f"sqlite:///{tmp_path}/sweeps.db", "compare-test", track=False)
    return grid.write_report("auror compare (test)")


def count_runs(monkeypatch) -> list[tuple]:
    calls, real = [], queue.run_experiment

    def counted(cfg, seeds=None, track=True, arms=(), resume=None):
        calls.append((tuple(arms), cfg.users.partition, cfg.users.malicious_fraction, cfg.seed, cfg.attack.name))
        return real(cfg, seeds, track=track, arms=arms, resume=resume)

    monkeypatch.setattr(queue, "run_experiment", counted)
    return calls


def test_compare_runs_each_cell_once_shares_benign_and_resumes(tmp_path, base, monkeypatch):
    calls = count_runs(monkeypatch)
    arms = ["benign", "attack", "median"]
    grid = compare_grid(base, [0], arms, ["label_flip"])
    md = run(grid, tmp_path)
    # benign once for the IID settings (they differ only in who attacks), once for Dirichlet
    assert sum(c[0] == ("benign",) for c in calls) == 2
    assert sum(c[0] == ("attack",) for c in calls) == sum(c[0] == ("median",) for c in calls) == len(COMPARE_SETTINGS)
    store = grid.store.load("label_flip", "median")
    assert sorted(r["label"] for r in store.values()) == sorted(s.label for s in COMPARE_SETTINGS)
    assert set(store) == {c.key for c in grid.cells["label_flip"] if c.arm == "median"}  # stored by key

    report = json.loads(md.with_suffix(".json").read_text())
    assert report["missing"] == [] and report["config"]["values"]["training.rounds"] == 4
    benign = grid.store.load("label_flip", "benign")
    for setting in COMPARE_SETTINGS:
        key = next(c.key for c in grid.cells["label_flip"] if c.arm == "benign" and c.label == setting.label)
        benign_accuracy = benign[key]["metrics"]["accuracy"]
        median = report["results"]["label_flip"]["median"][setting.label]
        assert median["accuracy_drop"] == pytest.approx(benign_accuracy - median["accuracy"])
        assert median["detection_rate"] is None  # a robust aggregator flags nobody
    assert "| median |" in md.read_text() and md.with_suffix(".png").stat().st_size > 0

    calls.clear()  # a second invocation finds every cell recorded
    run(compare_grid(base, [0], arms, ["label_flip"]), tmp_path)
    assert calls == []


def test_the_attack_matrix_shares_benign_cells_that_measure_the_same_success(tmp_path, base, monkeypatch):
    calls = count_runs(monkeypatch)
    md = run(compare_grid(base, [0], ["benign", "attack"], ["ipm", "min_max", "backdoor"]), tmp_path)
    # every other attack runs IID 30% and Dirichlet(0.5) 30%
    assert sorted(c[4] for c in calls if c[0] == ("attack",)) == ["backdoor"] * 2 + ["ipm"] * 2 + ["min_max"] * 2
    # one benign run per partition for the untargeted ones (success: the accuracy drop), one for the backdoor
    assert len([c for c in calls if c[0] == ("benign",)]) == 4
    table = json.loads(md.with_suffix(".json").read_text())["results"]
    assert list(table) == ["backdoor", "ipm", "min_max"]
    for attack in ("ipm", "min_max"):
        assert set(table[attack]["attack"]) == {s.label for s in MATRIX_SETTINGS}
        assert table[attack]["attack"]["IID 30%"]["attack_success_rate"] is None  # untargeted: AD is its success
    assert table["backdoor"]["benign"]["IID 30%"]["attack_success_rate"] < 0.2
    text = md.read_text()
    assert "## ipm (untargeted: success is AD)" in text and "## backdoor (backdoor, target 7)" in text


def test_an_unknown_attack_is_refused(base):
    with pytest.raises(ConfigError, match="^--attacks: must be registered attacks"):
        compare_grid(base, [0], None, ["sybil"])


def test_a_new_defense_only_runs_its_own_cells_and_the_report_names_missing_ones(tmp_path, base, monkeypatch):
    calls = count_runs(monkeypatch)
    run(compare_grid(base, [0], ["benign", "attack"], ["label_flip"]), tmp_path)
    partial = compare_grid(base, [0, 1], ["benign", "attack"], ["label_flip"]).write_report("c")
    missing = json.loads(partial.with_suffix(".json").read_text())["missing"]
    assert {m["seed"] for m in missing} == {1} and len(missing) == 2 * 2 + 4  # benign: 2 cells of seed 1
    assert "Not recorded yet (8 cells" in partial.read_text()
    calls.clear()
    md = run(compare_grid(base, [0], ["benign", "attack", "krum"], ["label_flip"]), tmp_path)
    assert {c[0] for c in calls} == {("krum",)}
    assert "| krum |" in md.read_text()


def test_report_only_without_cells_is_refused(base):
    with pytest.raises(ConfigError, match="--report-only: no cell of this config is recorded"):
        compare_grid(base, [0], None, None).write_report("c")


def cli(tmp_path, *args):
    return main(["compare", "--arms", "benign", "attack", "auror", "--attacks", "label_flip", "--seeds", "0",
                 "--no-track", "--storage", f"sqlite:///{tmp_path}/s.db",
                 *[a for kv in TINY for a in ("--set", kv)], "--set", f"tracking.reports_dir={tmp_path}/reports", *args])


def test_a_changed_config_makes_new_cells_and_never_overwrites_the_report_of_another(tmp_path, monkeypatch, capsys):
    """The comparison skips cells by key, not by label: another number of rounds runs new cells, and the
    report of the first config is refused in one line before any work, or written beside it with --name."""
    calls = count_runs(monkeypatch)
    assert cli(tmp_path) == 0
    first = len(calls)
    report = tmp_path / "reports" / "compare_digits.json"
    before = report.read_text()
    capsys.readouterr()
    assert cli(tmp_path, "--set", "training.rounds=3") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"auror: error: {report}: holds a report of another config (training.rounds was 4, "
                          "now 3); give --name NAME") and err.count("\n") == 1
    assert len(calls) == first and report.read_text() == before  # refused before any work
    assert cli(tmp_path, "--set", "training.rounds=3", "--name", "compare_digits_3rounds") == 0
    assert len(calls) == 2 * first  # every cell is new under the new config
    shown = json.loads((tmp_path / "reports" / "compare_digits_3rounds.json").read_text())
    assert shown["config"]["values"]["training.rounds"] == 3 and report.read_text() == before


def test_a_report_written_before_a_plugin_was_registered_is_still_its_config(tmp_path):
    """Keys the old report's config lacked (a defense added since) at their defaults: the same config;
    set otherwise, or a key it had changed: another."""
    from pipeline.experiment.store import check_report, report_config

    config = report_config(load_config(None, TINY))
    old = {k: v for k, v in config["values"].items() if not k.startswith("defense.meamed.")}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"config": {"hash": "written-before-meamed", "values": old}}))
    check_report(path, config, "elsewhere")  # no error
    for override, message in [("defense.meamed.byzantine_fraction=0.1", "defense.meamed.byzantine_fraction was None, now 0.1"),
                              ("training.rounds=3", "training.rounds was 4, now 3")]:
        with pytest.raises(ConfigError, match=f"holds a report of another config \\({message}\\)"):
            check_report(path, report_config(load_config(None, [*TINY, override])), "elsewhere")


def test_a_report_file_is_replaced_whole_or_not_at_all(tmp_path):
    """The workers of one sweep rewrite its report: each file goes through a temporary file, so a writer that
    fails midway leaves the previous report, and no temporary file is left beside it."""
    from pipeline.experiment.store import write_report_file

    path = tmp_path / "r.json"
    assert write_report_file(path, '{"a": 1}\n').read_text() == '{"a": 1}\n'

    def half_then_fail(f):
        f.write(b'{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_report_file(path, half_then_fail)
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    mode = os.stat(path).st_mode & 0o777  # as a plain open() makes it (the temporary file was owner-only)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_every_file_the_pipeline_writes_goes_through_the_atomic_writer():
    """Reports, plots, CSVs, best-params files and a run's latest.json are rewritten by workers and read
    by DVC: none is written in place (``write_text``, ``open(..., "w")``, ``savefig(path)``); the one
    exception is the storage's lock file, which holds nothing."""
    import re
    from pathlib import Path

    in_place = re.compile(r"\.write_text\(|\.write_bytes\(|savefig\((?!f\b)|(?<!fdopen)\(.*[\"']wb?[\"']\)")
    root = Path(__file__).resolve().parents[1]
    sources = [path for folder in ("pipeline", "lightning_modules", "datamodules")
               for path in sorted((root / folder).rglob("*.py"))]
    found = [f"{path.relative_to(root)}: {line.strip()}" for path in sources
             for line in path.read_text().splitlines() if in_place.search(line)]
    assert found == ['pipeline/experiment/storage.py: with open(db.with_name(db.name + ".lock"), "w") as lock:']


@pytest.mark.parametrize("content, damage", [("{bad", "Expecting property name"), ("", "Expecting value"),
                                             ("[1]", "not a map of cells"), ('{"k": 1}', "not a map of cells"),
                                             (b"\xff\xfe", "'utf-8' codec can't decode")])
def test_a_damaged_results_file_is_refused_in_one_line(tmp_path, content, damage):
    """A merge conflict or an edit in a store's file: one line naming the file and what to do, not a traceback."""
    from pipeline.experiment.store import ResultsStore

    store = ResultsStore(tmp_path)
    store.path("label_flip", "auror").parent.mkdir(parents=True)
    write = store.path("label_flip", "auror").write_bytes if isinstance(content, bytes) else \
        store.path("label_flip", "auror").write_text
    write(content)
    with pytest.raises(ConfigError, match=f"auror.json: not a results file \\({damage}.*\\); restore it"):
        store.load("label_flip", "auror")
    assert store.load("label_flip", "median") == {}
