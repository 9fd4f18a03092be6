import json

import mlflow
import pytest

from pipeline.experiment.cli import format_table, main, where_runs_are
from pipeline.experiment.arms import DEFAULT_ARMS as ARMS, METRICS
from pipeline.experiment.run import run_experiment
from tests.conftest import TINY


def test_tiny_run_logs_three_arms_to_mlflow(tiny_config):
    results = run_experiment(tiny_config)
    assert list(results) == list(ARMS) and all(list(m) == list(METRICS) for m in results.values())
    assert results["benign"]["accuracy_drop"] == 0.0
    assert results["benign"]["detection_rate"] is None and results["attack"]["detection_rate"] is None
    assert 0 <= results["auror"]["detection_rate"] <= 1

    saved = json.loads(open(f"{tiny_config.tracking.reports_dir}/latest.json").read())
    assert saved == results

    mlflow.set_tracking_uri(tiny_config.tracking.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[tiny_config.tracking.experiment], output_format="list")
    assert sorted(r.data.tags["arm"] for r in runs) == sorted(ARMS)
    client = mlflow.MlflowClient()
    for run in runs:
        arm = run.data.tags["arm"]
        assert run.info.status == "FINISHED"
        assert run.data.params["users.num_users"] == "5"
        history = client.get_metric_history(run.info.run_id, "attack_success_rate")
        assert [m.step for m in history] == list(range(1, 5))
        assert run.data.metrics["accuracy"] == pytest.approx(results[arm]["accuracy"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"detection.json", "config.json", f"{arm}.png"} <= artifacts
    auror_run = next(r for r in runs if r.data.tags["arm"] == "auror")
    report = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=auror_run.info.run_id, artifact_path="detection.json")).read())
    assert report["detection_round"] == 2 and set(report["scores"]) == {str(u) for u in range(5)}


def test_same_seed_gives_identical_metrics(tiny_config):
    first = run_experiment(tiny_config, track=False)
    second = run_experiment(tiny_config, track=False)
    assert first == second


def test_cli_run_on_tiny_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *[a for s in TINY for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "auror" in out and "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db" in out
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert (tmp_path / "reports" / "latest.json").is_file() and (tmp_path / "reports" / "latest.png").is_file()


def test_cli_averages_over_seeds(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_by_one = [run_experiment(tiny_config, seeds=[seed], track=False) for seed in (0, 1)]
    assert main(["run", "--seeds", "0", "1", *[a for s in TINY for a in ("--set", s)]]) == 0
    assert "mean over seeds 0, 1" in capsys.readouterr().out
    saved = json.loads((tmp_path / "reports" / "latest.json").read_text())
    for arm in ARMS:
        assert saved[arm]["accuracy"] == pytest.approx((one_by_one[0][arm]["accuracy"] + one_by_one[1][arm]["accuracy"]) / 2)
        assert saved[arm]["attack_success_rate"] == pytest.approx(
            (one_by_one[0][arm]["attack_success_rate"] + one_by_one[1][arm]["attack_success_rate"]) / 2)


def test_results_table_columns_line_up_for_long_defense_names():
    row = {"accuracy": 0.9, "detection_rate": None}
    lines = format_table({"benign": row, "auror_output_layer": row}).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].startswith("auror_output_layer ") and lines[1].rstrip().endswith("-")


def test_the_runs_line_names_a_tracking_server_or_the_local_ui_command():
    assert where_runs_are("http://127.0.0.1:5000") == "http://127.0.0.1:5000 (the MLflow tracking server)"
    assert where_runs_are("sqlite:///mlruns/mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"
