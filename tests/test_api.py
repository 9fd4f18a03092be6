"""`pipeline.api`, the Python entry points: they give what the command line gives (the same config, the same
one-line errors, the same metrics), detect() flags what the auror defense flags on the updates it received,
and the examples of docs/api.md and of the docstrings run."""

import csv
import dataclasses
import doctest
import inspect
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.api as api
from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.defenses import REGISTRY as DEFENSES
from pipeline.defenses.auror import AurorDefense, AurorParams
from pipeline.experiment import arms as arms_module
from pipeline.experiment.arms import DEFAULT_ARMS, METRICS
from pipeline.experiment.cli import main
from pipeline.experiment.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
SMALL = ["training.rounds=3", "training.device=cpu"]  # the digits setting, 3 rounds: about a second for 3 arms


def tracking_in(folder: Path) -> list[str]:
    """Overrides that send the reports, the MLflow store and the checkpoints under ``folder``."""
    return [f"tracking.reports_dir={folder}/reports", f"tracking.tracking_uri=sqlite:///{folder}/mlruns/mlflow.db",
            f"tracking.artifact_dir={folder}/mlruns/artifacts"]


def cli_error(capsys, argv: list[str]) -> str:
    """What ``auror ARGV`` prints on stderr, after checking it exits 2 (a bad input)."""
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Building any users' data fails the test: a refusal must come before any work."""
    def build(*args, **kwargs):
        raise AssertionError("the data was built: the input should have been refused first")

    monkeypatch.setattr(arms_module, "build_datamodule", build)


# load_config


def test_load_config_applies_the_overrides_over_the_params_file():
    cfg = api.load_config(DIGITS, ["training.rounds=3", "defense.auror.tau=0.6"])
    assert isinstance(cfg, Config) and cfg.data.name == "digits"
    assert (cfg.training.rounds, cfg.defense.auror.tau) == (3, 0.6)
    expected = api.load_config(str(DIGITS))  # the file alone, then the two keys by hand
    expected.training.rounds, expected.defense.auror.tau = 3, 0.6
    assert cfg == expected
    assert api.load_config() == Config()  # None: the built-in defaults


@pytest.mark.parametrize("params, overrides", [
    (None, ["training.rounds=0"]),  # out of range
    (None, ["training.round=3"]),  # unknown key
    (None, ["training.rounds"]),  # not KEY=VALUE
    (None, ["users.num_users=many"]),  # wrong type
    ("missing.yaml", []),
    ("bad.yaml", []),  # not valid YAML
], ids=["range", "unknown-key", "no-value", "type", "missing-file", "bad-yaml"])
def test_a_bad_config_is_the_line_auror_run_prints(params, overrides, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: the command line reads the built-in defaults too
    (tmp_path / "bad.yaml").write_text("training: [1\n")
    with pytest.raises(ConfigError) as err:
        api.load_config(params, overrides)
    message = str(err.value)
    assert "\n" not in message
    argv = ["run", *(["--params", params] if params else []), *(a for o in overrides for a in ("--set", o))]
    assert cli_error(capsys, argv) == f"auror: error: {message}\n"


def test_overrides_are_a_list_of_strings():
    with pytest.raises(TypeError, match="overrides: expected a list of strings"):
        api.load_config(None, "training.rounds=3")
    with pytest.raises(TypeError, match="overrides: expected a list of strings"):
        api.load_config(None, [("training.rounds", 3)])


# run


def test_run_gives_what_auror_run_reports(tmp_path, monkeypatch, capsys):
    cfg = api.load_config(DIGITS, [*SMALL, *tracking_in(tmp_path / "api")])
    results = api.run(cfg, seeds=[0, 1])
    assert list(results) == list(DEFAULT_ARMS)
    assert all(list(metrics) == list(METRICS) for metrics in results.values())
    assert results["benign"]["accuracy_drop"] == 0.0 and results["attack"]["detection_rate"] is None
    assert 0 <= results["auror"]["detection_rate"] <= 1

    # what it wrote, and nothing to MLflow nor checkpoints (track=False)
    reports = tmp_path / "api" / "reports"
    assert json.loads((reports / "latest.json").read_text()) == results
    with (reports / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(DEFAULT_ARMS) * 3 and {r["seed"] for r in rows} == {"0", "1"}
    assert (reports / "latest.png").is_file()
    assert not (tmp_path / "api" / "mlruns").exists()

    # `auror run --params configs/digits.yaml --seeds 0 1`, tracked: the same numbers
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--params", str(DIGITS), "--seeds", "0", "1",
            *(a for o in [*SMALL, *tracking_in(tmp_path / "cli")] for a in ("--set", o))]
    assert main(argv) == 0
    assert (tmp_path / "cli" / "mlruns" / "mlflow.db").is_file()
    assert json.loads((tmp_path / "cli" / "reports" / "latest.json").read_text()) == results


@pytest.mark.parametrize("overrides, kwargs, message", [
    ([], {"arms": ["benign", "krumm"]},
     "--arms: must be benign, attack or a registered defense ({}), got 'krumm'".format(", ".join(
         n for n, d in DEFENSES.items() if n != "none" and not d.pre_aggregator))),
    (["training.rounds=2"], {}, "defense.auror.window_rounds: must be in [1, training.rounds=2], got 3"),
    ([], {"arms": []}, "arms: give at least one arm (None: benign, attack, auror), got []"),
    ([], {"seeds": [-1]}, "seeds: must be in [0, 4294967295], got -1"),
    ([], {"seeds": [0.5]}, "seeds: expected integers, got 0.5"),
    ([], {"seeds": []}, "seeds: give at least one seed (None: the config's seed 0), got []"),
], ids=["unknown-arm", "window-longer-than-training", "no-arms", "seed-range", "seed-type", "no-seeds"])
def test_run_refuses_before_any_work(overrides, kwargs, message, tmp_path, no_work):
    cfg = api.load_config(None, [*SMALL, *overrides, *tracking_in(tmp_path)])
    with pytest.raises(ConfigError) as err:
        api.run(cfg, **kwargs)
    assert str(err.value) == message
    assert not (tmp_path / "reports").exists() and not (tmp_path / "mlruns").exists()


def test_run_refuses_what_auror_run_refuses_with_the_same_line(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    for overrides, arms in ((["training.rounds=2"], None), ([], ["krumm"])):
        with pytest.raises(ConfigError) as err:
            api.run(api.load_config(None, [*SMALL, *overrides]), arms=arms)
        argv = ["run", *(a for o in [*SMALL, *overrides] for a in ("--set", o)), *(["--arms", *arms] if arms else [])]
        assert cli_error(capsys, argv) == f"auror: error: {err.value}\n"


def test_run_revalidates_a_config_edited_by_hand(tmp_path, no_work):
    cfg = api.load_config(None, [*SMALL, *tracking_in(tmp_path)])
    cfg.users.malicious_fraction = 0.6
    with pytest.raises(ConfigError, match=r"^users.malicious_fraction: must be in \[0, 0.5\)"):
        api.run(cfg)
    with pytest.raises(TypeError, match="cfg: expected a Config"):
        api.run(cfg.to_dict())
    with pytest.raises(TypeError, match="arms: expected a list of strings"):
        api.run(api.load_config(None, [*SMALL, *tracking_in(tmp_path)]), arms="auror")


# run_arm


@pytest.mark.parametrize("arm, overrides, message", [
    ("krumm", [], "--arms: must be benign, attack or a registered defense ({}), got 'krumm'".format(
        ", ".join(n for n, d in DEFENSES.items() if n != "none" and not d.pre_aggregator))),
    ("auror", ["training.rounds=2"], "defense.auror.window_rounds: must be in [1, training.rounds=2], got 3"),
], ids=["unknown-arm", "window-longer-than-training"])
def test_run_arm_refuses_before_any_work(arm, overrides, message, no_work):
    with pytest.raises(ConfigError) as err:
        api.run_arm(api.load_config(None, [*SMALL, *overrides]), arm)
    assert str(err.value) == message


def test_run_arm_is_that_arm_of_run(tiny_config):
    together = api.run(tiny_config, arms=["benign", "auror"])
    for arm in ("benign", "auror"):
        alone = api.run_arm(tiny_config, arm)
        assert isinstance(alone, api.ArmRun) and (alone.arm, alone.seed) == (arm, tiny_config.seed)
        assert list(alone.metrics) == list(METRICS)
        # the same training; only the accuracy drop needs the benign arm beside it
        assert {k: v for k, v in alone.metrics.items() if k != "accuracy_drop"} == {
            k: v for k, v in together[arm].items() if k != "accuracy_drop"}
        assert [h["round"] for h in alone.history] == [1, 2, 3, 4]
        assert alone.history[-1]["accuracy"] == alone.metrics["accuracy"]
        assert isinstance(alone.model, torch.nn.Module)
        assert all(p.device.type == "cpu" for p in alone.model.parameters())
    assert alone.metrics["accuracy_drop"] is None  # auror alone
    assert api.run_arm(tiny_config, "benign").metrics["accuracy_drop"] == 0.0
    assert alone.detection["detection_round"] == 2
    assert set(alone.detection["scores"]) == {str(u) for u in range(tiny_config.users.num_users)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        alone.arm = "benign"


# detect


@pytest.mark.parametrize("overrides", [[], ["defense.auror.alpha_mode=quantile", "defense.auror.alpha=0.9"]],
                         ids=["absolute", "quantile"])
def test_detect_flags_what_the_auror_defense_flags(overrides, monkeypatch):
    """The updates the server received in the auror arm's one-round window (masked uploads: 70 % NaN), given to
    detect() with the arm's parameters: the same flags, scores and indicative features as the defense's report."""
    received = []
    aggregate = AurorDefense.aggregate

    def recording(self, uploads):
        received.append(uploads.updates.clone())
        return aggregate(self, uploads)

    monkeypatch.setattr(AurorDefense, "aggregate", recording)
    cfg = api.load_config(None, ["training.rounds=1", "defense.auror.window_rounds=1", "protocol.theta_u=0.3",
                                 "training.device=cpu", *overrides])
    report = api.run_arm(cfg, "auror").detection
    (updates,) = received
    assert updates.shape == (cfg.users.num_users, report["num_features"]) and updates.isnan().any()
    assert report["flagged_users"] == report["malicious_users"] != []  # the defense caught the attackers

    p = cfg.defense.auror
    found = api.detect(updates, alpha=p.alpha, tau=p.tau, alpha_mode=p.alpha_mode)
    assert isinstance(found, api.Detection)
    assert list(found.flagged) == report["flagged_users"]
    assert {str(u): round(float(s), 4) for u, s in enumerate(found.scores)} == report["scores"]
    assert found.threshold == report["threshold"]
    assert (found.num_features, found.num_indicative_features) == (report["num_features"],
                                                                   report["num_indicative_features"])
    assert found.indicative.sum() == found.num_indicative_features
    assert np.array_equal(found.indicative, found.centre_distance > found.threshold)

    as_numpy = api.detect(updates.numpy(), alpha=p.alpha, tau=p.tau, alpha_mode=p.alpha_mode)
    assert as_numpy.flagged == found.flagged and np.array_equal(as_numpy.scores, found.scores)


def test_detect_defaults_are_the_auror_defense_defaults():
    defaults = {name: p.default for name, p in inspect.signature(api.detect).parameters.items() if name != "updates"}
    params = AurorParams()
    assert defaults == {"alpha": params.alpha, "tau": params.tau, "alpha_mode": params.alpha_mode}


def test_detect_result_is_frozen_and_read_only():
    updates = torch.zeros(6, 4, requires_grad=True)  # a tensor with a graph is read without it
    with torch.no_grad():
        updates[0] = 1.0
        updates[5, 2] = float("nan")  # user 5 did not upload feature 2
    found = api.detect(updates, alpha=0.5, tau=0.5)
    assert found.flagged == (0,) and found.scores.tolist() == [1.0, 0, 0, 0, 0, 0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.flagged = ()
    with pytest.raises(ValueError, match="read-only"):
        found.scores[0] = 0.0


@pytest.mark.parametrize("updates, kwargs, error, message", [
    (np.zeros(5), {}, ValueError, "updates must be (users >= 2, features), got shape (5,)"),
    (np.zeros((1, 5)), {}, ValueError, "updates must be (users >= 2, features), got shape (1, 5)"),
    (np.array([[np.inf, 0.0], [0.0, 0.0]]), {}, ValueError,
     "updates contain Inf; mark missing or faulty values as NaN"),
    (np.array([["a", "b"], ["c", "d"]], dtype=object), {}, ValueError,
     "updates: expected a numeric (users, features) array or tensor, got ndarray"),
    (np.zeros((3, 2)), {"tau": 1.0}, ConfigError, "detect.tau: must be in [0, 1), got 1.0"),
    (np.zeros((3, 2)), {"alpha": math.nan}, ConfigError, "detect.alpha: must be a finite number >= 0, got nan"),
    (np.zeros((3, 2)), {"alpha": 1.0, "alpha_mode": "quantile"}, ConfigError,
     "detect.alpha: must be in [0, 1) with alpha_mode=quantile, got 1.0"),
    (np.zeros((3, 2)), {"alpha_mode": "median"}, ConfigError,
     "detect.alpha_mode: must be one of absolute, quantile, got 'median'"),
    (np.zeros((3, 2)), {"alpha": "0.1"}, ConfigError, "detect.alpha: expected a number, got '0.1'"),
], ids=["1-D", "one-user", "inf", "not-numbers", "tau", "alpha-nan", "quantile-alpha", "alpha-mode", "alpha-str"])
def test_detect_refuses_bad_input(updates, kwargs, error, message):
    with pytest.raises(error) as err:
        api.detect(updates, **kwargs)
    assert str(err.value).startswith(message)


# registries


def test_defenses_and_attacks_are_the_registries_as_the_cli_lists_them(capsys):
    assert api.defenses() == {name: cls.summary for name, cls in DEFENSES.items()}
    assert api.attacks() == {name: cls.summary for name, cls in ATTACKS.items()}
    for command, listed in (("defenses", api.defenses()), ("attacks", api.attacks())):
        assert main([command]) == 0
        lines = capsys.readouterr().out.splitlines()
        for name, summary in listed.items():
            assert any(re.fullmatch(rf"{re.escape(name)} +{re.escape(summary)}( \[omniscient\])?", line)
                       for line in lines), (command, name)


# documentation


def test_every_entry_point_is_documented_in_numpydoc_style():
    assert sorted(api.__all__) == sorted(set(api.__all__)) and all(hasattr(api, name) for name in api.__all__)
    for name in ("load_config", "run", "run_arm", "detect", "defenses", "attacks"):
        doc = inspect.getdoc(getattr(api, name))
        sections = ["Returns", "Examples"] + (["Parameters", "Raises"] if name not in ("defenses", "attacks") else [])
        for section in sections:
            assert f"\n{section}\n{'-' * len(section)}\n" in doc, (name, section)
    for name in ("ArmRun", "Detection"):
        assert "\nAttributes\n----------\n" in inspect.getdoc(getattr(api, name))


def test_the_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run()'s example writes under mkdtemp()
    result = doctest.testmod(api, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0 and result.attempted >= 20


def test_the_example_of_docs_api_md_runs(tmp_path, monkeypatch, capsys):
    page = (ROOT / "docs" / "api.md").read_text()
    assert "\n::: pipeline.api\n" in page
    blocks = re.findall(r"^```python\n(.*?)^```$", page, flags=re.S | re.M)
    assert len(blocks) == 1
    work, temp = tmp_path / "work", tmp_path / "temp"
    (work / "configs").mkdir(parents=True)
    temp.mkdir()
    shutil.copy(DIGITS, work / "configs")  # run as from the repository root, which it reads configs/ from
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    exec(compile(blocks[0], str(ROOT / "docs" / "api.md"), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert re.search(r"^auror +\{'accuracy': ", out, flags=re.M)
    assert "flagged (0,)" in out and "AUROR flagged" in out
    assert all(f"{name:20} {summary}" in out for name, summary in api.defenses().items())
    (written,) = temp.glob("*/reports/latest.json")
    assert list(json.loads(written.read_text())) == ["benign", "attack", "auror"]
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == ["configs", "configs/digits.yaml"]
