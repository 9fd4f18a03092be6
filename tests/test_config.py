import dataclasses
import math
from pathlib import Path

import re

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
    dataset, _, variant = path.stem.partition("_") if path.stem.startswith("mnist_") else (path.stem, "", "")
    assert cfg.data.name == dataset  # <dataset>.yaml, or mnist_<setting>.yaml beyond the paper's
    if variant == "cross_device":  # 1,000 users, 100 per round
        assert (cfg.users.num_users, cfg.users.per_round) == (1000, 100)
    else:  # the paper's settings; digits is the quick one
        assert cfg.users.num_users == 30 or path.stem == "digits"
    assert variant != "fedsgd" or cfg.training.algorithm == "fedsgd"


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


# --- config files that mean what they say --------------------------------------------------------------------------

def test_shipped_params_files_load_with_the_duplicate_refusing_reader():
    from pipeline.experiment.config import _read_yaml

    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        assert _read_yaml(path.read_text()) == (False, yaml.safe_load(path.read_text())), path.name


@pytest.mark.parametrize("text, message", [
    ("users:\n  num_users: 4\nusers:\n  min_samples: 5\n", "users: given twice (lines 1 and 3)"),
    ("users:\n  num_users: 4\n  num_users: 5\n", "users.num_users: given twice (lines 2 and 3)"),
    ("defense:\n  auror:\n    tau: 0.4\n\n    tau: 0.3\n", "defense.auror.tau: given twice (lines 3 and 5)"),
    ("defense: {auror: {tau: 0.4, tau: 0.3}}\n", "defense.auror.tau: given twice (both on line 1)"),
    ("seed: 1\n'seed': 2\n", "seed: given twice (lines 1 and 2)"),  # the same key, however quoted
    ("users: {num_users: 4}\nattack: {name: ipm}\nattack: {name: alie}\n", "attack: given twice (lines 2 and 3)"),
])
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"


def test_one_key_in_several_sections_and_a_merge_key_are_not_duplicates(tmp_path):
    from pipeline.experiment.config import _read_yaml

    path = tmp_path / "params.yaml"
    path.write_text("attack: {poisoned_fraction: 0.5, backdoor: {poisoned_fraction: 0.5},\n"
                    "         alie: {poisoned_fraction: 0.4}}\n"
                    "defense: {auror: {window_rounds: 3}, auror_noniid: {window_rounds: 3}}\n")
    cfg = load_config(path)
    assert cfg.attack.backdoor.poisoned_fraction == 0.5 and cfg.attack.alie.poisoned_fraction == 0.4
    assert _read_yaml("a: &a {x: 1}\nb:\n  <<: *a\n  x: 2\n") == (False, {"a": {"x": 1}, "b": {"x": 2}})


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here\n", "# users:\n#   num_users: 20\n\n"])
def test_an_empty_params_file_is_refused_saying_how_to_get_the_defaults(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"params.yaml: the params file is empty .*omit --params"):
        load_config(path)


def test_a_top_level_null_is_not_a_mapping_of_sections(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("~\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections, got null$"):
        load_config(path)


def test_a_folder_is_not_a_params_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a params file"):
        load_config(tmp_path)


def test_an_unknown_key_of_a_section_without_keys_says_so(tmp_path):
    from pipeline.defenses import REGISTRY

    empty = [name for name, d in REGISTRY.items() if not dataclasses.fields(d.Params)]
    assert "median" in empty and "none" in empty
    for name in empty:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"defense.{name}.x=1"])
        assert str(err.value) == f"defense.{name}.x: unknown key (defense.{name} takes no keys)"
    path = tmp_path / "params.yaml"
    path.write_text("defense: {median: {x: 1}}\n")
    with pytest.raises(ConfigError, match=r"defense.median.x: unknown key \(defense.median takes no keys\); was"):
        load_config(path)


def _numeric_parameters():
    """``(section, field)`` of every int or float parameter of every registered defense and attack."""
    from typing import get_type_hints

    from pipeline.attacks import REGISTRY as ATTACKS
    from pipeline.defenses import REGISTRY

    out = []
    for kind, registry in (("defense", REGISTRY), ("attack", ATTACKS)):
        for name, cls in registry.items():
            hints = get_type_hints(cls.Params)
            out += [(f"{kind}.{name}", f.name) for f in dataclasses.fields(cls.Params) if hints[f.name] in (int, float)]
    return out


NUMERIC = _numeric_parameters()


def test_the_numeric_parameters_cover_every_plugin_with_numbers():
    sections = {section for section, _ in NUMERIC}
    assert {"defense.auror", "defense.auror_output_layer", "defense.fltrust", "attack.ipm", "attack.alie"} <= sections
    assert ("defense.auror", "alpha") in NUMERIC and ("attack.model_replacement", "scale") in NUMERIC


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".inf", ".nan"])
@pytest.mark.parametrize("section, name", NUMERIC, ids=[f"{s}.{n}" for s, n in NUMERIC])
def test_every_numeric_plugin_parameter_refuses_nan_and_infinity(section, name, value):
    """Through --set, as a user gives it; an int parameter refuses them as not an int."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{section}.{name}={value}"])
    assert str(err.value).startswith(f"{section}.{name}: ") and "\n" not in str(err.value)


def test_a_new_plugin_parameter_is_refused_nan_and_infinity_without_a_rule_of_its_own():
    """The validation path checks every float field of every plug-in after its own rules
    (``check_finite_fields``), so a plug-in that forgets one is covered."""
    from pipeline.attacks.base import AttackParams
    from pipeline.defenses.base import check_finite_fields

    @dataclasses.dataclass
    class NoRules(AttackParams):
        scale: float = 1.0
        rounds: int = 3

    check_finite_fields(NoRules(), "attack.norules")
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError) as err:
            check_finite_fields(NoRules(scale=value), "attack.norules")
        assert str(err.value) == f"attack.norules.scale: must be a finite number, got {value!r}"


def test_an_infinite_auror_threshold_is_refused():
    """alpha=inf made no feature indicative: AUROR silently flagged nobody."""
    for override in ("defense.auror.alpha=inf", "defense.auror.alpha=.inf", "defense.auror_output_layer.alpha=inf"):
        with pytest.raises(ConfigError, match="alpha: must be a finite number >= 0, got inf$"):
            load_config(None, [override])
    assert load_config(None, ["defense.auror.alpha=0.5"]).defense.auror.alpha == 0.5


@pytest.mark.parametrize("root, message", [
    (100000, "defense.fltrust.root_size: must be smaller than digits's 1347 training samples (the root set is drawn "
             "from them), got 100000"),
    (1347, "defense.fltrust.root_size: must be smaller than digits's 1347 training samples (the root set is drawn "
           "from them), got 1347"),
    (1300, "defense.fltrust.root_size: a root set of 1300 of digits's 1347 training samples leaves a user 1, fewer "
           "than users.min_samples=10"),
])
def test_a_root_set_the_data_cannot_hold_is_refused_under_its_own_key(root, message):
    from pipeline.experiment.arms import DataCache, build_datamodule

    cfg = load_config(None, [f"defense.fltrust.root_size={root}"])
    with pytest.raises(ConfigError) as err:
        DataCache().get(cfg, "fltrust")
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="^defense.fltrust.root_size: "):
        build_datamodule(cfg, poison=False, root_size=root)


def test_a_users_problem_with_a_root_set_is_still_the_users():
    """The root set is named only when it is the cause: the data without it is fine."""
    from pipeline.experiment.arms import DataCache

    cfg = load_config(None, ["users.num_users=500"])
    with pytest.raises(ConfigError, match="^users.num_users: 500 users leave one"):
        DataCache().get(cfg, "fltrust")
    cfg = load_config(None, ["users.partition=dirichlet", "users.dirichlet_alpha=0.01", "users.min_samples=100"])
    with pytest.raises(ConfigError, match="^users.partition: "):
        DataCache().get(cfg, "fltrust")


def test_mlflows_file_store_is_accepted_when_mlflow_is_told_to_take_it(monkeypatch):
    """Refused in one line otherwise (docs/bad_inputs.md row 90): MLflow itself would raise after the data loads."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert load_config(None, ["tracking.tracking_uri=file:///tmp/mlruns"]).tracking.tracking_uri == "file:///tmp/mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        load_config(None, ["tracking.tracking_uri=file:///tmp/mlruns"])


@pytest.mark.parametrize("overrides, message", [
    (["training.model=vgg"], "training.model: must be one of auto, mlp, cnn, lenet5, resnet8, got 'vgg'"),
    (["training.model=lenet5"], "training.model: lenet5 takes 1x28x28 images (mnist, fashion_mnist), not "
                                "data.name=digits's, got 'lenet5'"),
    (["data.name=mnist", "training.model=resnet8"], "training.model: resnet8 takes 3x32x32 images (gtsrb, cifar10)"),
])
def test_a_model_that_does_not_take_the_datasets_images_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_training_model_auto_leaves_the_recorded_cells_keys_as_they_were():
    from pipeline.experiment.grid import cell_key

    cfg = load_config(None, [])
    assert cell_key(cfg, "auror") == cell_key(load_config(None, ["training.model=auto"]), "auror")
    assert cell_key(cfg, "auror") != cell_key(load_config(None, ["training.model=mlp"]), "auror")
