import json

from pipeline.experiment.config import load_config
from pipeline.experiment.report import PAPER, PaperSetting, markdown_table, paper_settings, run_report
from tests.conftest import TINY


def test_paper_settings_cover_the_tables():
    mnist = paper_settings(load_config(None, ["data.name=mnist"]))
    gtsrb = paper_settings(load_config(None, ["data.name=gtsrb"]))
    by_fraction = {s.malicious_fraction: s for s in mnist if s.malicious_fraction is not None}
    assert sorted(by_fraction) == [0.1, 0.2, 0.3]
    assert by_fraction[0.2].paper == PAPER[("mnist", "users", 0.2)] and by_fraction[0.1].paper is None
    assert "30%" in mnist[0].label  # the headline setting runs first
    assert any("protocol.theta_u=0.1" in s.overrides for s in mnist)
    assert any("users.partition=dirichlet" in s.overrides for s in mnist)
    poisoned = [o for s in gtsrb for o in s.overrides if o.startswith("attack.poisoned_fraction")]
    assert poisoned == [f"attack.poisoned_fraction={p}" for p in (0.5, 0.7, 0.9, 1.0)]


def test_markdown_table_puts_the_paper_beside_ours():
    arms = {"benign": {"accuracy": 0.9}, "attack": {"attack_success_rate": 0.7, "accuracy_drop": 0.05},
            "auror": {"detection_rate": 1.0, "false_positive_rate": None, "attack_success_rate": 0.01,
                      "accuracy_drop": 0.0}}
    table = markdown_table([(PaperSetting("30%", paper={"DR": 1.0, "SR": 0.69, "AD": 0.05}), arms)])
    header, _, row = table.splitlines()
    assert header.count("|") == row.count("|")
    assert row == "| 30% | 0.900 | 0.700 | 0.050 | 1.000 | - | 0.010 | 0.000 | 1.000 | 0.690 | 0.050 |"
    row = markdown_table([(PaperSetting("30%", paper={"DR": 1.0, "SR": 0.69, "AD": 0.05}), arms)], decimals=1)
    assert row.splitlines()[2] == "| 30% | 0.9 | 0.7 | 0.1 | 1.0 | - | 0.0 | 0.0 | 1.0 | 0.7 | 0.1 |"


def test_report_on_a_tiny_config_writes_table_plot_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md = run_report(load_config(None, [*TINY, "users.num_users=10"]), None, "auror report (test)")
    text = md.read_text()
    assert md.resolve() == tmp_path / "reports" / "digits.md"
    assert "auror report (test)" in text and text.count("malicious users |") == 3
    assert (tmp_path / "reports" / "digits_sr.png").stat().st_size > 1000
    report = json.loads((tmp_path / "reports" / "digits.json").read_text())
    assert set(report["results"]) == {"10% malicious users", "20% malicious users", "30% malicious users"}
    assert report["config"]["values"]["users.num_users"] == 10 and report["config"]["hash"] in text
    # the settings are cells of a grid: the results store holds them by key, not the default run's latest.json
    assert not (tmp_path / "reports" / "latest.json").exists()
    assert {len(json.loads((tmp_path / "reports" / "digits" / "paper" / f"{arm}.json").read_text()))
            for arm in ("attack", "auror")} == {3}
    # the three settings differ only in the attack: one benign cell serves them all
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert sorted(runs["tags.arm"]).count("benign") == 1 and len(runs) == 7
    assert set(runs["status"]) == {"FINISHED"}
    assert run_report(load_config(None, [*TINY, "users.num_users=10"]), None, "again").read_text().count("|") > 0
    assert len(mlflow.search_runs(search_all_experiments=True)) == 7  # every cell recorded: nothing runs again
