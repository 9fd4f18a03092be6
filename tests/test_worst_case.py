"""``auror worst-case``: a study per (defense, attack) pair with the attackers fixed, trial 0 the
configured knobs, resumable, and a report whose numbers are the studies'."""

import csv
import json

import pytest

from pipeline.experiment import studies
from pipeline.experiment.cli import main
from pipeline.experiment.config import ConfigError, with_overrides
from pipeline.experiment.tune import StudySpec
from pipeline.experiment.worst_case import run_worst_case, searchable_attacks, summarise

PAIRS = {"defenses": ["median", "krum"], "attacks": ["ipm", "label_flip"]}


def run(cfg, tmp_path, n_trials=3, **kw):
    return run_worst_case(cfg, kw.get("defenses", PAIRS["defenses"]), kw.get("attacks", PAIRS["attacks"]), n_trials,
                          f"sqlite:///{tmp_path}/optuna.db", None, "auror worst-case (test)")


# trials all at one value (no knob moves the attack past the defense) are no reason for a warning
@pytest.mark.filterwarnings("error:Target and region quantiles select the same set")
def test_every_pair_is_a_study_of_the_attack_knobs_with_the_attackers_fixed(tiny_config, tmp_path):
    md = run(tiny_config, tmp_path)
    report = json.loads(md.with_suffix(".json").read_text())
    assert md.name == "worst_case_digits.md" and md.with_suffix(".png").is_file()
    assert {(r["defense"], r["attack"]) for r in report["pairs"]} == {(d, a) for d in PAIRS["defenses"]
                                                                      for a in PAIRS["attacks"]}
    storage = studies.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    for row in report["pairs"]:
        study = studies.optuna.load_study(study_name=row["study"], storage=storage)
        trials = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert row["trials"] == 3 and row["metric"] == ("AD" if row["attack"] == "ipm" else "SR")
        assert trials[0].user_attrs["baseline"] and trials[0].user_attrs["overrides"] == []
        assert row["default"] == trials[0].value and row["worst"] == max(t.value for t in trials) >= row["default"]
        # the attack's knobs only: never the number of attackers
        assert all(not any(o.startswith("users.") for o in t.user_attrs["overrides"]) for t in trials)
        assert all(k.startswith("attack.") for t in trials for k in t.params)
        assert all(t.user_attrs["overrides"] for t in trials[1:])  # the other trials searched
        with open(tmp_path / "reports" / "worst_case" / "digits" / f"trials_{row['study']}.csv") as f:
            assert [r["setting"] for r in csv.DictReader(f)] == ["configured", "searched", "searched"]
    for entry in report["leaderboard"]:  # each defense's worst cell is the maximum over its pairs
        mine = [r for r in report["pairs"] if r["defense"] == entry["defense"]]
        assert entry["SR"]["worst"] == max(r["worst"] for r in mine if r["metric"] == "SR")
        assert entry["AD"]["worst"] == max(r["worst"] for r in mine if r["metric"] == "AD")
        assert entry["worst"] == max(r["worst"] for r in mine)
    ranked = [entry["worst"] for entry in report["leaderboard"]]
    assert ranked == sorted(ranked)  # best first
    text = md.read_text()
    assert "| median |" in text and "trial 0: the attack's configured knobs" in text


def test_running_it_again_continues_the_studies_and_rewrites_the_same_report(tiny_config, tmp_path):
    first = json.loads(run(tiny_config, tmp_path, defenses=["median"], attacks=["ipm"]).with_suffix(".json").read_text())
    again = json.loads(run(tiny_config, tmp_path, defenses=["median"], attacks=["ipm"]).with_suffix(".json").read_text())
    assert again == first
    study = studies.optuna.load_study(study_name="worst-ipm-median-digits",
                                      storage=studies.open_storage(f"sqlite:///{tmp_path}/optuna.db"))
    assert len(study.trials) == 3  # the finished study ran no trial the second time
    more = json.loads(run(tiny_config, tmp_path, 4, defenses=["median"], attacks=["ipm"]).with_suffix(".json").read_text())
    assert more["pairs"][0]["trials"] == 4 and more["pairs"][0]["default"] == first["pairs"][0]["default"]


def test_the_studies_of_one_config_share_their_benign_arm(tiny_config, tmp_path, monkeypatch):
    """Four studies, two ways of measuring success (the benign cell's key holds it): two benign runs, not four;
    new studies of the same config later read them from the store and run none."""
    from pipeline.experiment import tune

    benign_runs = []
    real = tune.run_arm

    def counting(cfg, arm, *args, **kwargs):
        benign_runs.extend([arm] if arm == "benign" else [])
        return real(cfg, arm, *args, **kwargs)

    monkeypatch.setattr(tune, "run_arm", counting)
    run(tiny_config, tmp_path, n_trials=1)
    assert len(benign_runs) == 2
    storage = studies.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    accuracy = {studies.optuna.load_study(study_name=f"worst-{a}-{d}-digits", storage=storage).user_attrs[
        "benign_accuracy"] for a in PAIRS["attacks"] for d in PAIRS["defenses"]}
    assert len(accuracy) == 1  # the benign model does not depend on how success is measured
    run(tiny_config, tmp_path, n_trials=1, defenses=["trimmed_mean"])
    assert len(benign_runs) == 2


@pytest.mark.parametrize("args, message", [
    (["--attacks", "sybil"], "--attacks: must be registered attacks"),
    (["--attacks", "mimic"], "--attacks: mimic has no knobs to search"),
    (["--defenses", "krumm"], "--defenses: must be registered defenses"),
    (["--n-trials", "0"], "--n-trials: must be >= 1, got 0"),
    (["--name", "../x"], "--name: letters, digits"),
    (["--seeds", "0", "1"], "--seeds: auror worst-case runs one seed per trial"),
])
def test_bad_arguments_exit_2_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["worst-case", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"auror: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "reports").exists()


def test_the_default_attacks_are_those_with_knobs():
    assert set(searchable_attacks()) >= {"label_flip", "ipm", "alie", "sign_flip", "gaussian"}
    assert "mimic" not in searchable_attacks()


def test_a_report_of_another_config_is_not_written_over(tiny_config, tmp_path):
    run(tiny_config, tmp_path, 1, defenses=["median"], attacks=["ipm"])
    import dataclasses

    other = dataclasses.replace(tiny_config, seed=1)
    with pytest.raises(ConfigError, match="holds a report of another config"):
        run(other, tmp_path, 1, defenses=["median"], attacks=["ipm"])


def test_an_interrupted_search_leaves_the_report_of_the_studies_it_finished(tiny_config, tmp_path, monkeypatch):
    from pipeline.experiment import worst_case

    real = worst_case.run_study

    def stopped_at_label_flip(spec):
        if spec.cfg.attack.name == "label_flip":
            raise KeyboardInterrupt
        return real(spec)

    monkeypatch.setattr(worst_case, "run_study", stopped_at_label_flip)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, tmp_path, 1, defenses=["median"])
    stem = tmp_path / "reports" / "worst_case_digits"
    report = json.loads(stem.with_suffix(".json").read_text())
    done, pending = report["pairs"]
    assert (done["attack"], done["trials"]) == ("ipm", 1) and done["worst"] is not None
    assert (pending["attack"], pending["trials"], pending["worst"], pending["default"]) == ("label_flip", 0, None, None)
    assert "Searched to the budget: 1 of 2 pairs" in stem.with_suffix(".md").read_text()


def test_report_only_runs_nothing_and_reads_the_studies_the_storage_holds(tiny_config, tmp_path, monkeypatch):
    from pipeline.experiment import tune

    ran = json.loads(run(tiny_config, tmp_path, 2, defenses=["median"], attacks=["ipm"]).with_suffix(".json").read_text())
    monkeypatch.setattr(tune, "run_arm", lambda *a, **k: pytest.fail("--report-only trained a model"))
    md = run_worst_case(tiny_config, ["median"], ["ipm", "label_flip"], 2, f"sqlite:///{tmp_path}/optuna.db", None,
                        "auror worst-case --report-only (test)", report_only=True)
    report = json.loads(md.with_suffix(".json").read_text())
    assert report["pairs"][0] == ran["pairs"][0]
    assert report["pairs"][1]["trials"] == 0 and report["leaderboard"][0]["AD"] == ran["leaderboard"][0]["AD"]
    assert "Searched to the budget: 1 of 2 pairs" in md.read_text()


def test_report_only_refuses_a_storage_without_the_studies_and_a_study_of_another_setting(tiny_config, tmp_path):
    import dataclasses

    storage = f"sqlite:///{tmp_path}/optuna.db"
    with pytest.raises(ConfigError, match="--report-only: no trial of these 1 studies"):
        run_worst_case(tiny_config, ["median"], ["ipm"], 1, storage, None, "test", report_only=True)
    assert not (tmp_path / "reports" / "worst_case_digits.json").exists()
    run(tiny_config, tmp_path, 1, defenses=["median"], attacks=["ipm"])
    (tmp_path / "reports" / "worst_case_digits.json").unlink()  # (else the report's own check refuses first)
    other = dataclasses.replace(tiny_config, seed=1)
    with pytest.raises(ConfigError, match="study worst-ipm-median-digits: made with another setting "
                                          r"\(config.seed was 0, now 1\); give --name NAME"):
        run_worst_case(other, ["median"], ["ipm"], 1, storage, None, "test", report_only=True)


def test_another_setting_is_searched_in_studies_of_its_own_named_by_the_search(tiny_config, tmp_path, monkeypatch):
    """Dirichlet(0.5) after IID: under the IID search's name it is refused before any training; under a
    name of its own (``--name worst_case_digits_dirichlet``) its studies are ``worst-<attack>-<defense>-
    digits_dirichlet``, beside the IID ones."""
    from pipeline.experiment import tune

    storage = f"sqlite:///{tmp_path}/optuna.db"
    run(tiny_config, tmp_path, 1, defenses=["median"], attacks=["ipm"])
    (tmp_path / "reports" / "worst_case_digits.json").unlink()
    dirichlet = with_overrides(tiny_config, ["users.partition=dirichlet"])
    trained, real = [], tune.run_arm
    monkeypatch.setattr(tune, "run_arm", lambda cfg, arm, *a, **k: trained.append(arm) or real(cfg, arm, *a, **k))
    with pytest.raises(ConfigError, match="study worst-ipm-median-digits: made with another setting "
                                          r"\(config.users.partition was 'iid', now 'dirichlet'\)"):
        run_worst_case(dirichlet, ["krum", "median"], ["ipm"], 1, storage, None, "test")
    assert trained == []  # krum's new study comes first: refused before it ran
    md = run_worst_case(dirichlet, ["krum", "median"], ["ipm"], 1, storage, "worst_case_digits_dirichlet", "test")
    report = json.loads(md.with_suffix(".json").read_text())
    assert [r["study"] for r in report["pairs"]] == ["worst-ipm-krum-digits_dirichlet",
                                                     "worst-ipm-median-digits_dirichlet"]
    assert md.name == "worst_case_digits_dirichlet.md" and trained.count("krum") == trained.count("median") == 1


def test_the_tables_give_a_searched_knob_to_three_significant_digits():
    from pipeline.experiment.worst_case import short_knob

    assert short_knob("attack.boost=5.190263017695163") == "attack.boost=5.19"
    assert short_knob("attack.alie.z=0.00012345") == "attack.alie.z=0.000123"
    assert short_knob("attack.malicious_epochs=4") == "attack.malicious_epochs=4"
    assert short_knob("attack.alie.variant=backdoor") == "attack.alie.variant=backdoor"


@pytest.mark.parametrize("variant, metric", [("untargeted", "AD"), ("backdoor", "SR")])
def test_a_pair_is_scored_by_the_metric_of_its_attack_as_configured(tiny_config, variant, metric):
    # ALIE's success depends on its variant: an accuracy drop must never be ranked among the SRs
    cfg = with_overrides(tiny_config, ["attack.name=alie", f"attack.alie.variant={variant}"])
    assert summarise(StudySpec(cfg, "attack", "krum"), None)["metric"] == metric


def test_a_composed_arm_is_judged_like_any_defense(tiny_config, tmp_path):
    """``nnm+median`` (a pre-aggregator in front of a rule) is a defense of the search: its study reads the
    sections of both parts and is named with a dot, as names allow no '+'."""
    md = run(tiny_config, tmp_path, 2, defenses=["nnm+median"], attacks=["ipm"])
    (row,) = json.loads(md.with_suffix(".json").read_text())["pairs"]
    assert (row["defense"], row["study"], row["trials"]) == ("nnm+median", "worst-ipm-nnm.median-digits", 2)
    storage = studies.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = studies.optuna.load_study(study_name=row["study"], storage=storage)
    assert set(study.user_attrs["setting"]["config"]["defense"]) == {"nnm", "median"}
    assert row["worst"] >= row["default"] is not None


def test_a_study_searched_to_the_budget_is_not_opened_again(tiny_config, tmp_path, monkeypatch, caplog):
    """A worker that comes back to a search passes the finished studies by (no MLflow run, no study opened) and
    says how many pairs are left and about how long they take at its pace."""
    import logging

    from pipeline.experiment import worst_case

    run(tiny_config, tmp_path, 1, defenses=["median"], attacks=["ipm"])
    real = worst_case.run_study
    opened = []
    monkeypatch.setattr(worst_case, "run_study", lambda spec: opened.append(spec.study_name) or real(spec))
    with caplog.at_level(logging.INFO, logger="auror"):
        run(tiny_config, tmp_path, 1, defenses=["median", "krum"], attacks=["ipm"])
    assert opened == ["worst-ipm-krum-digits"]
    assert "1 pairs searched in" in caplog.text and "0 to go" in caplog.text
