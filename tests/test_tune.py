import time

import mlflow
import pytest
from optuna.trial import TrialState

from pipeline.experiment import storage, studies
from pipeline.experiment.cli import main
from pipeline.experiment.config import load_config
from pipeline.core.loop import Callback
from pipeline.experiment.objectives import defense_objective
from pipeline.experiment.tune import StudySpec, run_study
from tests.conftest import TINY


def tiny_overrides(tmp_path) -> list[str]:
    return [
        *TINY,
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"tracking.artifact_dir={tmp_path}/mlruns/artifacts",
        f"tracking.reports_dir={tmp_path}/reports",
    ]


def tiny_spec(tmp_path, overrides=(), **kw) -> StudySpec:
    kw = {"n_trials": 3, "study_name": "t", **kw}
    return StudySpec(load_config(None, [*tiny_overrides(tmp_path), *overrides]),
                     storage=f"sqlite:///{tmp_path}/optuna.db", **kw)


def study_runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["auror"], output_format="list")


class InterruptSecondRun(Callback):
    """Ctrl-C in the middle of the second trial."""

    def __init__(self) -> None:
        self.runs = 0

    def on_run_start(self, loop) -> None:
        self.runs += 1

    def on_round_end(self, loop, round_, metrics) -> None:
        if self.runs == 2 and round_ == 2:
            raise KeyboardInterrupt


def test_defense_objective_is_one_for_a_perfect_defense():
    assert defense_objective(1.0, 0.0, 0.0, -0.01) == 1.0
    assert defense_objective(1.0, 0.2, 0.1, 0.05) == pytest.approx(0.65)


def test_defense_study_logs_nested_runs_and_writes_best_params(tmp_path):
    result = run_study(tiny_spec(tmp_path))
    assert [t.state for t in result.study.trials] == [TrialState.COMPLETE] * 3
    first = result.study.trials[0]  # the configured setting, as configured: it searches nothing
    assert first.params == {} and first.user_attrs["baseline"] and first.user_attrs["overrides"] == []

    runs = study_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["optuna_trial"] for c in children) == ["0", "1", "2"]
    assert all(c.info.status == "FINISHED" and "objective" in c.data.metrics for c in children)
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "attack_success_rate")] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"optimization_history.png", "param_importances.png", "best_t.yaml"} <= artifacts

    best = load_config(result.best_params_path)  # what `auror run --params` reads
    assert result.best_params_path == tmp_path / "reports" / "best_t.yaml"
    assert best.users.num_users == 5
    assert best.defense.auror.tau == pytest.approx(result.study.best_trial.params.get("defense.auror.tau", 0.5))


@pytest.mark.slow
def test_interrupted_study_resumes_with_finished_trials_kept(tmp_path, monkeypatch, capsys):
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_spec(tmp_path, extra_callbacks=[InterruptSecondRun()]))
    first = tiny_spec(tmp_path)
    opened = studies.open_storage(first.storage)
    study = studies.optuna.load_study(study_name="t", storage=opened)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    runs = {r.data.tags.get("optuna_trial", "parent"): r.info.status for r in study_runs(tmp_path)}
    assert runs == {"parent": "KILLED", "0": "FINISHED", "1": "KILLED"}

    # a trial of a process killed with SIGKILL: running, with a heartbeat that stopped
    monkeypatch.setattr(storage, "GRACE_PERIOD_S", 1)
    opened = studies.open_storage(first.storage)  # with the short grace period
    study = studies.optuna.load_study(study_name="t", storage=opened)
    dead = study.ask()
    opened.record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # past the 1 s grace period by more than a second: SQLite's now() has whole seconds

    # the same command again (through the CLI) runs only the missing trials
    args = ["tune", "--study-name", "t", "--storage", first.storage, "--n-trials", "3"]
    assert main([*args, *[a for s in tiny_overrides(tmp_path) for a in ("--set", s)]]) == 0
    assert "Best params:" in capsys.readouterr().out
    study = studies.optuna.load_study(study_name="t", storage=opened)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                               TrialState.COMPLETE, TrialState.COMPLETE]
    parents = [r for r in study_runs(tmp_path) if "optuna_trial" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, reopened


@pytest.mark.parametrize("args, message", [
    (["--kind", "both"], "--kind: must be one of defense, attack"),
    (["--n-trials", "0"], "--n-trials: must be >= 1"),
    (["--kind", "attack", "--max-malicious-fraction", "0.6"], "--max-malicious-fraction: must be in (0, 0.5)"),
    (["--study-name", "a/b"], "--study-name: letters, digits"),
    (["--seeds", "0", "1"], "--seeds: auror tune runs one seed per trial"),
])
def test_bad_tune_arguments_exit_2_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["tune", *args, *[a for s in TINY for a in ("--set", s)]]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()


def test_a_missing_dataset_is_refused_before_the_study_or_its_mlflow_run_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    (tmp_path / "nodata").mkdir()
    args = ["tune", "--n-trials", "1", "--study-name", "t", "--storage", f"sqlite:///{tmp_path}/t.db",
            *[a for s in [*TINY, "data.name=mnist", f"data.root={tmp_path / 'nodata'}", "data.download=false"]
              for a in ("--set", s)]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("auror: error: MNIST not found under") and err.count("\n") == 1
    assert not (tmp_path / "t.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_defense_study_searches_any_defense_with_search_ranges(tmp_path):
    import yaml

    result = run_study(tiny_spec(tmp_path, defense="trimmed_mean", n_trials=2))
    trials = result.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params == {} and set(trials[1].params) == {"defense.trimmed_mean.beta"}
    assert result.study.user_attrs["setting"]["defense"] == "trimmed_mean"
    runs = study_runs(tmp_path)
    assert {r.data.tags["defense"] for r in runs} == {"trimmed_mean"}
    assert {r.data.tags["arm"] for r in runs if "mlflow.parentRunId" in r.data.tags} == {"trimmed_mean"}
    best = yaml.safe_load(result.best_params_path.read_text())
    assert best["defense"]["trimmed_mean"]["beta"] == result.study.best_trial.params.get("defense.trimmed_mean.beta", 0.1)
    # a robust aggregator flags nobody: DR and FPR count 0 in the objective, so it is -SR - max(AD, 0)
    m = result.study.best_trial.user_attrs["metrics"]
    assert result.study.best_value == pytest.approx(-m["attack_success_rate"] - max(m["accuracy_drop"], 0))


def test_an_attack_study_searches_the_chosen_attack_and_maximises_its_own_success(tmp_path):
    import csv

    spec = tiny_spec(tmp_path, ["attack.name=ipm"], kind="attack", defense="median", n_trials=2, study_name=None)
    result = run_study(spec)
    trials = result.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params == {} and set(trials[1].params) == {"attack.ipm.epsilon", "users.malicious_users"}
    for t in trials:  # untargeted: the objective is the accuracy drop, there is no SR
        m = t.user_attrs["metrics"]
        assert m["attack_success_rate"] is None and t.value == pytest.approx(m["accuracy_drop"])
    name = "attack-ipm-median-digits"  # the attack's and the defense's names in the study's
    assert result.best_params_path == tmp_path / "reports" / f"best_{name}.yaml"
    rows = list(csv.DictReader((tmp_path / "reports" / f"trials_{name}.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1"] and [r["setting"] for r in rows] == ["configured", "searched"]
    assert rows[0]["attack.ipm.epsilon"] == "" and float(rows[1]["attack.ipm.epsilon"]) == trials[1].params[
        "attack.ipm.epsilon"]
    assert float(rows[1]["objective"]) == pytest.approx(trials[1].value)


def test_opening_a_storage_whose_tables_another_worker_is_creating_retries(tmp_path, monkeypatch):
    # PostgreSQL has no lock around Optuna's table creation: a worker that loses the race gets an
    # IntegrityError (a duplicate type name); the tables exist by then, so it opens them again
    import sqlalchemy

    real, calls = studies.optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception("UniqueViolation"))
        return real(url, **kwargs)

    monkeypatch.setattr(studies.optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(studies.time, "sleep", lambda s: None)
    opened = studies.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    assert len(calls) == 2 and opened.get_all_studies() == []


@pytest.mark.parametrize("attack, key, configured", [("alie", "attack.alie.z", 0.0),
                                                     ("model_replacement", "attack.model_replacement.scale", 0.0)])
def test_the_first_trial_of_an_attack_study_is_the_configured_attack(tmp_path, attack, key, configured):
    """z = 0 (ALIE's z_max) and scale = 0 (users / attackers) lie outside the searched ranges: the first
    trial runs them as configured, not moved into the range."""
    spec = tiny_spec(tmp_path, [f"attack.name={attack}"], kind="attack", defense="median", n_trials=1)
    result = run_study(spec)
    (trial,) = result.study.trials
    assert trial.params == {} and trial.user_attrs["overrides"] == []
    run = next(r for r in study_runs(tmp_path) if r.data.tags.get("optuna_trial") == "0")
    assert float(run.data.params[key]) == configured


def test_a_trial_of_a_config_a_finished_trial_ran_takes_its_value_without_running_it(tmp_path, monkeypatch):
    """Fang's search may pick the configured setting again (trimmed mean, b = 2): the config of trial 0, whose
    run is deterministic. Its value is trial 0's, the arm is not trained again, and it does not count in the
    budget: two trials that count are three in all."""
    import optuna

    from pipeline.experiment import tune

    spec = tiny_spec(tmp_path, ["attack.name=fang", "attack.fang.target=trimmed_mean"], kind="attack",
                     defense="median", fixed_attackers=True, n_trials=2)
    study = optuna.create_study(study_name="t", storage=spec.storage, direction="maximize")
    study.enqueue_trial({}, user_attrs={"baseline": True})
    study.enqueue_trial({"attack.fang.target": "trimmed_mean", "attack.fang.b": 2.0})
    study.enqueue_trial({"attack.fang.target": "krum"})
    trained, real = [], tune.run_arm

    def counted(cfg, arm, *args, **kwargs):
        trained.append((arm, cfg.attack.fang.target))
        return real(cfg, arm, *args, **kwargs)

    monkeypatch.setattr(tune, "run_arm", counted)
    trials = run_study(spec).study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trained == [("benign", "trimmed_mean"), ("median", "trimmed_mean"), ("median", "krum")]
    assert trials[1].user_attrs["same_as"] == 0 and "same_as" not in trials[2].user_attrs
    assert trials[1].value == trials[0].value and trials[1].user_attrs["metrics"] == trials[0].user_attrs["metrics"]
    assert [r.data.tags["optuna_trial"] for r in study_runs(tmp_path) if "optuna_trial" in r.data.tags] == ["2", "0"]


def test_a_second_queued_configured_trial_steps_back_without_running(tmp_path, monkeypatch):
    """Two workers that open a new study at once each queue trial 0: the later copy is failed as surplus, not run."""
    import optuna

    from pipeline.experiment import tune

    spec = tiny_spec(tmp_path, ["attack.name=ipm"], kind="attack", defense="median", fixed_attackers=True, n_trials=2)
    study = optuna.create_study(study_name="t", storage=spec.storage, direction="maximize")
    for _ in range(2):
        study.enqueue_trial({}, user_attrs={"baseline": True})
    trained, real = [], tune.run_arm
    monkeypatch.setattr(tune, "run_arm", lambda cfg, arm, *a, **k: trained.append(arm) or real(cfg, arm, *a, **k))
    trials = run_study(spec).study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["surplus"] and trials[2].params and trained == ["benign", "median", "median"]


def test_a_space_with_fewer_settings_than_the_budget_ends_after_three_times_it(tmp_path):
    """Every trial after the first repeats its config (the sampler proposes b = 2 again and again): the study
    stops after 3 x its budget of trials, with the one that counts, and is done."""
    import optuna

    from pipeline.experiment import studies as studies_module

    spec = tiny_spec(tmp_path, ["attack.name=fang", "attack.fang.target=trimmed_mean"], kind="attack",
                     defense="median", fixed_attackers=True, n_trials=2)
    study = optuna.create_study(study_name="t", storage=spec.storage, direction="maximize")
    study.enqueue_trial({}, user_attrs={"baseline": True})
    for _ in range(8):
        study.enqueue_trial({"attack.fang.target": "trimmed_mean", "attack.fang.b": 2.0})
    trials = run_study(spec).study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == studies_module.REPEATS_CAP * 2 and studies_module.count_finished(study) == 1
    assert all(t.user_attrs["same_as"] == 0 for t in trials[1:]) and studies_module.searched(study, 2)
