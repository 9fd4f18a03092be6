from pathlib import Path

import pytest
import yaml

from pipeline.experiment.cli import main
from pipeline.experiment.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_yaml_equals_the_defaults():
    assert load_config(ROOT / "params.yaml") == Config()
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == Config().to_dict()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.data.name == path.stem
    assert cfg.users.num_users == 30 or path.stem == "digits"  # the paper's settings; digits is the quick one


def test_overrides_are_typed():
    cfg = load_config(None, ["users.malicious_fraction=0.2", "training.hidden_sizes=[8,4]", "seed=3"])
    assert cfg.users.malicious_fraction == 0.2 and cfg.training.hidden_sizes == [8, 4] and cfg.seed == 3


BAD = [
    ("users.malicious_fraction=1.5", "users.malicious_fraction"),
    ("users.malicious_fraction=-0.1", "users.malicious_fraction"),
    ("attack.poisoned_fraction=2", "attack.poisoned_fraction"),
    ("data.name=cifar", "data.name"),
    ("attack.source_class=12", "attack.source_class"),
    ("attack.target_class=1", "attack.target_class"),
    ("defense.auror.tau=1", "defense.auror.tau"),
    ("training.rounds=0", "training.rounds"),
    ("training.lr=abc", "training.lr"),
    ("training.hidden_sizes=[]", "training.hidden_sizes"),
    ("users.num_users=2.5", "users.num_users"),
    ("users.colour=red", "users.colour"),
    ("nosuch.key=1", "nosuch"),
    ("seed", "--set"),
    ("users.partition=pathological", "users.partition"),
    ("users.dirichlet_alpha=0", "users.dirichlet_alpha"),
    ("protocol.theta_u=0", "protocol.theta_u"),
    ("protocol.theta_d=1.5", "protocol.theta_d"),
    ("protocol.upload_selection=smallest", "protocol.upload_selection"),
    ("protocol.epsilon=1", "protocol.gamma"),
    ("protocol.gamma=-1", "protocol.gamma"),
    ("defense.auror.alpha=nan", "defense.auror.alpha"),
]


@pytest.mark.parametrize("override, key", BAD)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(key) or key in message.split(":")[0]
    assert "\n" not in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("attack:\n  boots: 2\n")
    with pytest.raises(ConfigError, match="attack.boots: unknown key"):
        load_config(path)
    path.write_text("attack: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("override, key", BAD[:4])
def test_cli_rejects_bad_config_with_exit_2_and_no_run(override, key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"auror: error: {key}") and err.count("\n") == 1
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "reports").exists()


def test_missing_dataset_is_one_line_exit_2_and_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert main(["run", "--set", "data.name=mnist", "--set", f"data.root={empty}", "--set", "data.download=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("auror: error: MNIST not found under") and str(empty) in err and err.count("\n") == 1
    assert "AUROR_DATA_DIR" in err
    assert not (tmp_path / "mlruns").exists()


def test_partition_leaving_a_user_too_few_samples_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["run", "--set", "users.partition=dirichlet", "--set", "users.dirichlet_alpha=0.01",
            "--set", "users.min_samples=100"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("auror: error: users.partition:") and "min_samples=100" in err and err.count("\n") == 1
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("arms, overrides, key", [
    (["auror"], ["defense.auror.window_rounds=99"], "defense.auror.window_rounds"),
    (["krum"], ["protocol.theta_u=0.5"], "protocol.theta_u"),
    (["benign", "nobody"], [], "--arms"),
])
def test_an_arm_the_config_cannot_run_is_refused_naming_the_key(arms, overrides, key):
    from pipeline.experiment.arms import check_arms

    cfg = load_config(None, overrides)  # valid on its own: only the arm makes it wrong
    with pytest.raises(ConfigError) as err:
        check_arms(cfg, arms)
    assert str(err.value).startswith(f"{key}: ")


def test_partial_uploads_are_refused_only_for_defenses_that_need_whole_updates():
    from pipeline.defenses import REGISTRY
    from pipeline.experiment.arms import check_arms

    cfg = load_config(None, ["protocol.theta_u=0.5"])
    partial = [name for name, d in REGISTRY.items() if d.handles_missing and name != "none"]
    assert {"auror", "median", "trimmed_mean", "norm_clipping"} <= set(partial)
    assert check_arms(cfg, ["benign", "attack", *partial]) == ["benign", "attack", *partial]
