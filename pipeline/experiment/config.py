"""Typed, validated experiment configuration.

The dataclasses below hold the defaults; ``params.yaml`` at the repository
root mirrors them (a test keeps the two equal) and is what DVC reads.
Every value is checked in :func:`validate` before any work starts, and every
problem is reported as a :class:`ConfigError` whose message names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin, get_type_hints

import yaml

from pipeline.core.device import check_device_name
from pipeline.core.errors import ConfigError
from pipeline.core.faults import FaultsConfig
from pipeline.core.masking import ProtocolConfig
from pipeline.core.sampling import PARTICIPATIONS, round_size
from pipeline.core.server_optimizer import ServerConfig
from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.defenses import REGISTRY
from pipeline.core.errors import check, positive
from pipeline.defenses.base import check_finite_fields
from pipeline.experiment.storage import check_sqlite_file


@dataclass
class DataConfig:
    name: str = "digits"
    # digits only: the held-out share (MNIST and GTSRB come with their test sets)
    test_fraction: float = 0.25
    # where MNIST / GTSRB live in torchvision's layout; AUROR_DATA_DIR overrides it
    root: str = "data"
    download: bool = True


@dataclass
class UsersConfig:
    num_users: int = 10
    malicious_fraction: float = 0.3
    partition: str = "iid"
    # partition=dirichlet: label shares per user ~ Dirichlet(dirichlet_alpha)
    dirichlet_alpha: float = 0.5
    min_samples: int = 10
    # the users of a round: a fraction in (0, 1] of num_users or a whole count (1.0: everyone, every round)
    per_round: float = 1.0


@dataclass
class AttackSettings:
    """What every attack shares; each attack's own parameters are its section ``attack.<name>``."""

    name: str = "label_flip"  # a registered attack (`auror attacks`)
    # the targeted attacks' classes (a backdoor's target is target_class)
    source_class: int = 1
    target_class: int = 7
    # label_flip, auror_adaptive: fraction of each malicious user's source-class samples relabelled
    poisoned_fraction: float = 1.0
    # the attackers' local training (attacks that train on poisoned data)
    malicious_epochs: int = 3
    malicious_lr_multiplier: float = 1.0
    # label_flip, backdoor, auror_adaptive: malicious updates are multiplied by this before upload
    boost: float = 3.0
    # under users.per_round: sampled (like everyone) | every_round (the population's share in every round)
    participation: str = "sampled"


# the shared settings, then one section per registered attack, ``attack.<name>``
AttackConfig = dataclasses.make_dataclass(
    "AttackConfig", [(name, cls.Params, field(default_factory=cls.Params)) for name, cls in ATTACKS.items()],
    bases=(AttackSettings,))


# one section per registered defense, ``defense.<name>``, holding its own parameters dataclass
DefenseConfig = dataclasses.make_dataclass(
    "DefenseConfig", [(name, cls.Params, field(default_factory=cls.Params)) for name, cls in REGISTRY.items()])


@dataclass
class TrainingConfig:
    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 32])
    model: str = "auto"  # auto (mlp; cnn for gtsrb, cifar10) | mlp | cnn | lenet5 | resnet8
    device: str = "auto"  # auto (a CUDA GPU when PyTorch sees one, else the CPU) | cpu | cuda | cuda:N
    algorithm: str = "fedavg"  # fedavg (local epochs) | fedsgd (one local step on one batch per round)
    eval_every: int = 1  # evaluate the global model every N rounds (the last round always)


@dataclass
class ReportConfig:
    """What ``auror report`` writes (read by the report alone: DVC reruns only the report stage)."""

    decimals: int = 3  # digits after the point in the Markdown tables


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_dir: str = "mlruns/artifacts"
    experiment: str = "auror"
    reports_dir: str = "reports"


@dataclass
class Config:
    """An experiment's whole configuration, one section per concern (``params.yaml`` mirrors it); build it
    with :func:`load_config` (validated), never by hand."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> Any:
        """A plug-in's parameters by its section's name: ``defense.<name>`` or ``attack.<name>``."""
        kind, plugin = name.split(".")
        return getattr(getattr(self, kind), plugin)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` (``defense.<name>.key``, ``attack.<name>.key`` for the plug-ins' sections),
        for MLflow params."""
        return _flatten(self.to_dict())


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


DATASETS = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "gtsrb": 43, "cifar10": 10}  # name -> number of classes
# each dataset's images (channels, height, width), and the images each convolutional model takes
DATASET_IMAGES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "gtsrb": (3, 32, 32),
                  "cifar10": (3, 32, 32)}
MODEL_IMAGES = {"cnn": (3, 32, 32), "lenet5": (1, 28, 28), "resnet8": (3, 32, 32)}
MODELS = ("auto", "mlp", *MODEL_IMAGES)  # mlp takes any (flattened)
# groups of keys added after results were recorded, at the values that behave as before: while all of a
# group's keys hold them, the group is left out of a cell's key
UNKEYED_DEFAULTS = (
    {"training.model": "auto"},
    {"users.per_round": 1.0}, {"attack.participation": "sampled"},
    {"training.algorithm": "fedavg"}, {"training.eval_every": 1},
    {f"server.{f.name}": f.default for f in dataclasses.fields(ServerConfig)},
)
ALGORITHMS = ("fedavg", "fedsgd")
# the tracking stores MLflow opens (its own list, less the bare path); file: only with MLFLOW_ALLOW_FILE_STORE
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "file")
MAX_SEED = 2**32 - 1  # scikit-learn's random_state bound
PARTITIONS = ("iid", "dirichlet")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the annotated type, or fail."""
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if isinstance(value, str) and hint is not str:
        parsed = yaml.safe_load(value)
        value = parsed if parsed is not None else value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML reads "1e-3" and "inf" as strings
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: {_unknown_key(prefix, known)}")
    kwargs = {}
    for name in known & values.keys():
        hint, key = hints[name], f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, values[name], key)
        else:
            kwargs[name] = _coerce(key, values[name], hint)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Check every value; raise :class:`ConfigError` naming the first bad key."""
    check(0 <= cfg.seed <= MAX_SEED, "seed", f"must be in [0, {MAX_SEED}]", cfg.seed)
    d, u, a, df, t = cfg.data, cfg.users, cfg.attack, cfg.defense, cfg.training
    check(d.name in DATASETS, "data.name", f"must be one of {', '.join(DATASETS)}", d.name)
    check(0 < d.test_fraction < 1, "data.test_fraction", "must be in (0, 1)", d.test_fraction)
    check(bool(d.root.strip()), "data.root", "must not be empty", d.root)
    check(u.num_users >= 2, "users.num_users", "must be >= 2", u.num_users)
    check(0 <= u.malicious_fraction < 0.5, "users.malicious_fraction",
          "must be in [0, 0.5) (AUROR assumes malicious users are a minority)", u.malicious_fraction)
    check(u.partition in PARTITIONS, "users.partition", f"must be one of {', '.join(PARTITIONS)}", u.partition)
    check(positive(u.dirichlet_alpha), "users.dirichlet_alpha", "must be a finite number > 0", u.dirichlet_alpha)
    check(u.min_samples >= 1, "users.min_samples", "must be >= 1", u.min_samples)
    check(positive(u.per_round) and (u.per_round <= 1 or (u.per_round.is_integer() and u.per_round <= u.num_users)),
          "users.per_round", f"must be a fraction in (0, 1] or a whole count of at most users.num_users={u.num_users}",
          u.per_round)
    check(round_size(u.per_round, u.num_users) >= 2, "users.per_round",
          f"must give at least 2 users per round (of users.num_users={u.num_users})", u.per_round)
    num_classes = DATASETS[d.name]
    for key in ("source_class", "target_class"):
        value = getattr(a, key)
        check(0 <= value < num_classes, f"attack.{key}", f"must be a class of {d.name} (0..{num_classes - 1})", value)
    check(a.name in ATTACKS, "attack.name", f"must be one of {', '.join(ATTACKS)}", a.name)
    check(a.source_class != a.target_class, "attack.target_class", "must differ from attack.source_class", a.target_class)
    check(0 <= a.poisoned_fraction <= 1, "attack.poisoned_fraction", "must be in [0, 1]", a.poisoned_fraction)
    check(a.malicious_epochs >= 1, "attack.malicious_epochs", "must be >= 1", a.malicious_epochs)
    check(positive(a.malicious_lr_multiplier), "attack.malicious_lr_multiplier", "must be a finite number > 0",
          a.malicious_lr_multiplier)
    check(positive(a.boost), "attack.boost", "must be a finite number > 0", a.boost)
    check(a.participation in PARTICIPATIONS, "attack.participation", f"must be one of {', '.join(PARTICIPATIONS)}",
          a.participation)
    for name in ATTACKS:
        getattr(a, name).validate(f"attack.{name}")
        check_finite_fields(getattr(a, name), f"attack.{name}")
    ATTACKS[a.name].check_config(getattr(a, a.name), cfg, f"attack.{a.name}")
    check(t.rounds >= 1, "training.rounds", "must be >= 1", t.rounds)
    check(t.local_epochs >= 1, "training.local_epochs", "must be >= 1", t.local_epochs)
    check(t.batch_size >= 1, "training.batch_size", "must be >= 1", t.batch_size)
    check(positive(t.lr), "training.lr", "must be a finite number > 0", t.lr)
    check(len(t.hidden_sizes) >= 1 and all(h >= 1 for h in t.hidden_sizes),
          "training.hidden_sizes", "must be a non-empty list of positive sizes", t.hidden_sizes)
    check(t.model in MODELS, "training.model", f"must be one of {', '.join(MODELS)}", t.model)
    if t.model in MODEL_IMAGES:
        fits = [name for name, shape in DATASET_IMAGES.items() if shape == MODEL_IMAGES[t.model]]
        check(cfg.data.name in fits, "training.model", f"{t.model} takes {'x'.join(map(str, MODEL_IMAGES[t.model]))} "
              f"images ({', '.join(fits)}), not data.name={cfg.data.name}'s", t.model)
    check_device_name(t.device, "training.device")
    check(t.algorithm in ALGORITHMS, "training.algorithm", f"must be one of {', '.join(ALGORITHMS)}", t.algorithm)
    check(t.algorithm == "fedavg" or t.local_epochs == 1, "training.local_epochs",
          "must be 1 under training.algorithm=fedsgd (one local step per round)", t.local_epochs)
    check(t.eval_every >= 1, "training.eval_every", "must be >= 1", t.eval_every)
    cfg.server.validate()
    for name in REGISTRY:
        getattr(df, name).validate(f"defense.{name}")
        check_finite_fields(getattr(df, name), f"defense.{name}")
    cfg.protocol.validate()
    cfg.faults.validate(u.num_users, t.rounds)
    check(0 <= cfg.report.decimals <= 6, "report.decimals", "must be in [0, 6]", cfg.report.decimals)
    tr = cfg.tracking
    check(bool(tr.experiment), "tracking.experiment", "must not be empty", tr.experiment)
    check(re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", tr.tracking_uri) is not None, "tracking.tracking_uri",
          "must be a URI with a scheme, e.g. sqlite:///mlruns/mlflow.db", tr.tracking_uri)
    scheme = tr.tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()  # postgresql+psycopg2: postgresql
    if scheme == "file":  # MLflow's file store refuses new runs unless told (its maintenance mode)
        check(os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true", "tracking.tracking_uri",
              "MLflow's file store takes new runs only with MLFLOW_ALLOW_FILE_STORE=true set; use "
              "sqlite:///<file> (the default: sqlite:///mlruns/mlflow.db)", tr.tracking_uri)
    check(scheme in TRACKING_SCHEMES, "tracking.tracking_uri",
          f"must name one of MLflow's stores ({', '.join(f'{s}:' for s in TRACKING_SCHEMES)}), "
          "e.g. sqlite:///mlruns/mlflow.db", tr.tracking_uri)
    for key in ("artifact_dir", "reports_dir"):
        check(bool(getattr(tr, key).strip()), f"tracking.{key}", "must not be empty", getattr(tr, key))
    return cfg


def check_output_folders(cfg: Config) -> None:
    """``tracking.reports_dir`` and ``tracking.artifact_dir`` (the checkpoints go beside it) are folders this
    process can write, or can be made: refused in one line before any work, nothing created."""
    keys = ["reports_dir"] + ([] if cfg.tracking.tracking_uri.startswith(("http://", "https://")) else ["artifact_dir"])
    uri = cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_dir():
        check_sqlite_file(Path(uri.removeprefix("sqlite:///")), "tracking.tracking_uri")
    for key in keys:
        path = Path(getattr(cfg.tracking, key))
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"tracking.{key}: {existing} is a file, not a folder, got {str(path)!r}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"tracking.{key}: {existing} is not writable by this user, got {str(path)!r}")


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 100  # a name becomes a file name and a database column (VARCHAR(200) holds it with a key)


def check_name(option: str, name: str) -> str:
    """A name that reaches a file name or a database column: letters, digits, '.', '_' and '-', starting
    with a letter or digit, at most 100 characters (so it cannot leave its folder)."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"{option}: letters, digits, '.', '_' and '-' only, starting with a letter or digit, "
                          f"got {name!r}")
    if len(name) > MAX_NAME:
        raise ConfigError(f"{option}: at most {MAX_NAME} characters, got {len(name)}")
    return name


def first_repeat(values: Sequence[Any]) -> Any | None:
    """The first value of ``values`` given a second time (``None`` if none is)."""
    return next((v for i, v in enumerate(values) if v in values[:i]), None)


def without_unkeyed(values: dict[str, Any], cfg: "Config") -> dict[str, Any]:
    """Flat ``values`` of ``cfg`` less each group of keys added after results were recorded
    (:data:`UNKEYED_DEFAULTS`; each plug-in's ``unkeyed_defaults``) while all its keys hold the values
    that behave as before: a cell's key and a report's config stay what they were before the keys existed."""
    groups = [*UNKEYED_DEFAULTS, *({f"{kind}.{name}.{k}": v for k, v in getattr(getattr(cfg, kind), name).unkeyed_defaults.items()}
                                  for kind, names in (("defense", REGISTRY), ("attack", ATTACKS)) for name in names)]
    for group in groups:
        if all(values.get(k) == v for k, v in group.items()):
            values = {k: v for k, v in values.items() if k not in group}
    return values


def config_hash(values: dict) -> str:
    """12 hex digits of the SHA-256 of ``values`` as sorted JSON: what keys a cell and names a report's config."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def first_difference(old: dict, new: dict, prefix: str = "") -> str:
    """``"key was A, now B"`` for the first key (sorted, nested) where two config dicts differ; ``""`` if none."""
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return ""


def parse_override(text: str) -> tuple[list[str], str]:
    """``"attack.boost=2"`` -> ``(["attack", "boost"], "2")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. users.malicious_fraction=0.2")
    return key.strip().split("."), value.strip()


def _read_yaml(text: str) -> tuple[bool, Any]:
    """``(empty, value)`` of a params file's text (``empty``: no YAML node at all, nothing but comments and
    blank lines). Raises ``yaml.YAMLError``, or :class:`ConfigError` for a key given twice in a mapping,
    which PyYAML silently resolves by keeping the last."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return True, None
        repeated = _repeated_key(node)
        if repeated:
            key, first, second = repeated
            raise ConfigError(f"{key}: given twice " + (f"(both on line {first})" if first == second
                                                         else f"(lines {first} and {second})"))
        return False, loader.construct_document(node)  # the composed node, not the text parsed again
    finally:
        loader.dispose()


def _repeated_key(node: yaml.Node, path: tuple[str, ...] = ()) -> tuple[str, int, int] | None:
    """``(dotted key, first line, second line)`` of the first key given twice in a mapping below ``node``
    (a merge key ``<<`` may override, by design)."""
    children = [(str(i), v) for i, v in enumerate(node.value)] if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in seen:
                    return ".".join([*path, key.value]), seen[key.value], line
                seen[key.value] = line
            children.append((str(getattr(key, "value", "?")), value))
    for name, child in children:
        found = _repeated_key(child, (*path, name))
        if found:
            return found
    return None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``--set`` overrides; validated."""
    values: dict[str, Any] = Config().to_dict()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a params file; name a YAML file, "
                              "e.g. --params configs/digits.yaml")
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        try:
            empty, loaded = _read_yaml(path.read_text(encoding="utf-8"))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = getattr(err, "problem", None)
            raise ConfigError(f"{path}: not valid YAML{where}" + (f" ({problem})" if problem else "")) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the params file ({err.strerror})") from None
        if empty:
            raise ConfigError(f"{path}: the params file is empty (nothing but comments or blank lines); "
                              "to run with the built-in defaults, omit --params (and have no ./params.yaml)")
        if not isinstance(loaded, dict):  # a top-level explicit null (`~`) too
            raise ConfigError(f"{path}: expected a mapping of sections, got "
                              f"{'null' if loaded is None else type(loaded).__name__}")
        _merge(values, loaded, "", path)
    _override(values, overrides)
    return validate(_build(Config, values, ""))


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with ``--set`` style ``overrides`` applied, validated (the config of a grid's cell)."""
    values = cfg.to_dict()
    _override(values, overrides)
    return validate(_build(Config, values, ""))


def _override(values: dict[str, Any], overrides: Sequence[str]) -> None:
    for text in overrides:
        keys, raw = parse_override(text)
        node = values
        for i, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                sections = sorted(k for k, v in node.items() if isinstance(v, dict))
                raise ConfigError(f"{'.'.join(keys[:i + 1])}: unknown section (known: {', '.join(sections)})")
            node = node[key]
        if keys[-1] not in node:
            raise ConfigError(f"{'.'.join(keys)}: {_unknown_key('.'.join(keys[:-1]), node)}")
        node[keys[-1]] = raw


def _unknown_key(section: str, known) -> str:
    """``unknown key (known: a, b)``, or ``unknown key (<section> takes no keys)`` for a section without any."""
    if not known:
        return f"unknown key ({section} takes no keys)"
    return f"unknown key (known: {', '.join(sorted(known))})"


def _merge(base: dict, update: dict, prefix: str, path: Path) -> None:
    """Merge a params file's values into ``base``; a key ``base`` lacks is an error
    (a file written for another version of auror, or a typo)."""
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{path}: {prefix}{key}: {_unknown_key(prefix.rstrip('.'), base)}; "
                              "was the file written by another version of auror?")
        if isinstance(base[key], dict):
            if value is not None and not isinstance(value, dict):  # an empty section reads as None
                raise ConfigError(f"{path}: {prefix}{key}: expected a section (a mapping of keys), got {value!r}")
            _merge(base[key], value or {}, f"{prefix}{key}.", path)
        else:
            base[key] = value
