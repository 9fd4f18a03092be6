"""The arms of an experiment and the one place that assembles them: data, attack, model,
defense and the loop, from one :class:`~pipeline.experiment.config.Config`.

- ``benign``: nobody attacks, no defense (the reference model M_B);
- ``attack``: the malicious users run the attack ``attack.name``, no defense (M_P);
- one arm per registered defense (``auror``, ``krum``, ...): the same attack,
  that defense on the server (for AUROR, the paper's M_A).

Every arm measures the attack's own success metric (the benign arm too: its
baseline). Nothing here tracks, checkpoints to a folder of its own or reports:
the commands above it do.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.attacks.base import Attack, UserData
from pipeline.core.device import select_device
from pipeline.core.metrics import defense_detection_rates
from pipeline.core.sampling import round_size
from pipeline.defenses import REGISTRY
from pipeline.defenses.compose import defense_class, defense_params
from pipeline.experiment.config import Config, ConfigError
from pipeline.experiment.store import write_report_file
from pipeline.lazy import OnFirstUse, torch

if TYPE_CHECKING:
    from datamodules.federated import FederatedDataModule
    from pipeline.core.checkpoint import Checkpoint
    from pipeline.core.loop import Callback

# the data, the models and the loop load on first use (Lightning's import costs seconds): checking arms and
# configs, and refusing them, needs none of it
digits, mnist, fashion_mnist, gtsrb, cifar10 = (OnFirstUse(f"datamodules.{name}")
                                               for name in ("digits", "mnist", "fashion_mnist", "gtsrb", "cifar10"))
mlp, cnn, lenet, resnet = (OnFirstUse(f"lightning_modules.{name}") for name in ("mlp", "cnn", "lenet", "resnet"))
core_loop = OnFirstUse("pipeline.core.loop")

# benign and attack run without defense; every other arm is the attack against the defense of that name (a
# pre-aggregator only in front of a rule: "<pre>+<rule>", pipeline.defenses.compose)
ARMS = ("benign", "attack", *(name for name, d in REGISTRY.items() if name != "none" and not d.pre_aggregator))
DEFAULT_ARMS = ("benign", "attack", "auror")
METRICS = ("accuracy", "attack_success_rate", "accuracy_drop", "detection_rate", "false_positive_rate")

DATAMODULES: dict[str, Callable[..., FederatedDataModule]] = {
    "digits": lambda cfg, **kw: digits.DigitsDataModule(test_fraction=cfg.data.test_fraction, **kw),
    "mnist": lambda cfg, **kw: mnist.MNISTDataModule(root=cfg.data.root, download=cfg.data.download, **kw),
    "fashion_mnist": lambda cfg, **kw: fashion_mnist.FashionMNISTDataModule(root=cfg.data.root,
                                                                            download=cfg.data.download, **kw),
    "gtsrb": lambda cfg, **kw: gtsrb.GTSRBDataModule(root=cfg.data.root, download=cfg.data.download, **kw),
    "cifar10": lambda cfg, **kw: cifar10.CIFAR10DataModule(root=cfg.data.root, download=cfg.data.download, **kw),
}
MODELS: dict[str, Callable[[Config, FederatedDataModule], torch.nn.Module]] = {  # training.model
    "mlp": lambda cfg, data: mlp.MLPClassifier(data.num_features, data.num_classes, cfg.training.hidden_sizes,
                                               cfg.training.lr),
    "cnn": lambda cfg, data: cnn.CNNClassifier(num_classes=data.num_classes, lr=cfg.training.lr),
    "lenet5": lambda cfg, data: lenet.LeNet5Classifier(data.num_classes, lr=cfg.training.lr),
    "resnet8": lambda cfg, data: resnet.ResNet8Classifier(data.num_classes, lr=cfg.training.lr),
}
AUTO_MODELS = {"digits": "mlp", "mnist": "mlp", "fashion_mnist": "mlp", "gtsrb": "cnn", "cifar10": "cnn"}


def build_model(cfg: Config, data: FederatedDataModule) -> torch.nn.Module:
    """The users' model: ``training.model``, or the dataset's default for ``auto``."""
    name = AUTO_MODELS[cfg.data.name] if cfg.training.model == "auto" else cfg.training.model
    return MODELS[name](cfg, data)


@dataclass
class ArmResult:
    arm: str
    metrics: dict[str, float | None]
    history: list[dict[str, float]]
    detection: dict
    module: torch.nn.Module
    example: torch.Tensor | None = None  # one test input: logging the model traces it


def arm_defense(arm: str) -> str:
    """The registered defense an arm runs: ``none`` for the benign and attack arms."""
    return "none" if arm in ("benign", "attack") else arm


def check_arms(cfg: Config, arms: Sequence[str], option: str = "--arms") -> list[str]:
    """The arms in run order (benign first: the others' accuracy drop needs it); raises
    :class:`ConfigError` for an unknown arm (naming ``option``) or a defense the config cannot run (its
    ``check_config``)."""
    for arm in arms:
        if arm in REGISTRY and REGISTRY[arm].pre_aggregator:
            raise ConfigError(f"{option}: {arm} is a pre-aggregator: write it in front of a rule, e.g. {arm}+median")
        if arm not in ARMS and "+" not in arm:
            raise ConfigError(f"{option}: must be benign, attack or a registered defense ({', '.join(ARMS[2:])}), "
                              f"got {arm!r}")
        name = arm_defense(arm)
        try:
            cls = defense_class(name)
        except ConfigError as err:  # a composition that is not one
            raise ConfigError(f"{option}: {err}") from None
        cls.check_config(defense_params(cfg.defense, name), cfg, f"defense.{name}")
    return [a for a in ARMS if a in arms] + [a for a in dict.fromkeys(arms) if a not in ARMS]


def check_defenses(option: str, cfg: Config, names: Sequence[str]) -> None:
    """``names`` are defenses the config can run: registered ones, or compositions (``nnm+median``);
    refused in one line naming ``option`` (``--defense``, ``--defenses``)."""
    for name in names:
        if name not in ARMS[2:] and "+" not in name and not (name in REGISTRY and REGISTRY[name].pre_aggregator):
            raise ConfigError(f"{option}: must be registered defenses ({', '.join(ARMS[2:])}) or compositions "
                              f"such as nnm+median, got {name!r}")
    check_arms(cfg, names, option)


def make_attack(cfg: Config) -> Attack:
    """The configured attack (``attack.name``) with its own section."""
    return ATTACKS[cfg.attack.name](getattr(cfg.attack, cfg.attack.name), cfg.attack)


def build_datamodule(cfg: Config, poison: bool, root_size: int = 0,
                     root_key: str = "defense.fltrust.root_size") -> FederatedDataModule:
    """Prepare (download when allowed) and set up the users' data; when ``poison``, the
    malicious users' data as the configured attack leaves it (:func:`poison_users`).

    ``root_size`` samples are held out as the server's root set (FLTrust), the config key ``root_key``.
    Raises ``DatasetMissingError`` when the data cannot be found, and
    :class:`ConfigError` when the partition leaves a user too few samples, naming ``root_key``
    when the root set is the cause (:func:`check_root_set`).
    """
    u = cfg.users
    data = DATAMODULES[cfg.data.name](
        cfg, num_users=u.num_users, malicious_fraction=u.malicious_fraction, seed=cfg.seed,
        partition=u.partition, dirichlet_alpha=u.dirichlet_alpha, min_samples=u.min_samples, root_size=root_size,
    )
    data.prepare_data()
    try:
        data.setup()
    except ValueError as err:  # the partition's one-line reason (or a root set larger than the data)
        if root_size:
            check_root_set(cfg, root_size, root_key)
        raise ConfigError(f"users.partition: {err}") from None
    fewest = min(len(i) for i in data.user_indices)
    if fewest < u.min_samples:  # the Dirichlet partition checks it itself
        if root_size:
            check_root_set(cfg, root_size, root_key, fewest)
        raise ConfigError(f"users.num_users: {u.num_users} users leave one with {fewest} training samples, fewer "
                          f"than users.min_samples={u.min_samples}")
    if poison:
        attack = make_attack(cfg)
        attack.setup(data.train_x)
        poison_users(data, attack)
    return data


def check_root_set(cfg: Config, root_size: int, key: str, fewest: int | None = None) -> None:
    """Called when the users' data with a root set of ``root_size`` failed (``fewest``: the fewest samples it
    left a user, when it got that far): raise :class:`ConfigError` under ``key`` naming the dataset's number
    of training samples when the root set is the cause. The data without a root set is built to tell:
    its own error, when it fails too; nothing when the root set is not the cause."""
    n = len(build_datamodule(cfg, poison=False).train_y)
    if root_size >= n:
        raise ConfigError(f"{key}: must be smaller than {cfg.data.name}'s {n} training samples (the root set is "
                          f"drawn from them), got {root_size}")
    if fewest is not None:
        raise ConfigError(f"{key}: a root set of {root_size} of {cfg.data.name}'s {n} training samples leaves a user "
                          f"{fewest}, fewer than users.min_samples={cfg.users.min_samples}")


def poison_users(data: FederatedDataModule, attack: Attack) -> None:
    """The attack's data side: the malicious users' data replaced by what they train on."""
    poisoned = attack.poison_data(UserData(data.train_x, data.train_y, data.user_indices, data.malicious),
                                  data.poison_rng())
    data.train_x, data.train_y, data.poisoned = poisoned.x, poisoned.y, poisoned.poisoned


def prepare_dataset(cfg: Config) -> Path:
    """Download (when allowed) and decode the dataset; write its sizes to
    ``<reports_dir>/data.json`` (what DVC's prepare stage outputs: the data
    itself lives outside the repository, under data.root or AUROR_DATA_DIR)."""
    data = build_datamodule(cfg, poison=False)
    info = {"dataset": cfg.data.name, "train_samples": len(data.train_y), "test_samples": len(data.test_y),
            "classes": data.num_classes, "input_shape": list(data.test_x.shape[1:])}
    return write_report_file(Path(cfg.tracking.reports_dir) / "data.json", json.dumps(info) + "\n")


def user_behaviour(cfg: Config, attack: Attack, malicious: torch.Tensor, attacking: bool) -> core_loop.UserBehaviour:
    """Honest users train ``training.local_epochs``; attacking users use the shared attack knobs
    their attack reads (``malicious_epochs``, ``malicious_lr_multiplier``, ``boost``), and
    the attack's anomaly weight ``w`` (``model_replacement``) as ``(1 - w)`` on their loss plus the pull ``2 w``."""
    a, attackers = cfg.attack, malicious & attacking
    trains = attackers & attack.trains_maliciously
    anomaly = attack.anomaly_weight()
    return core_loop.UserBehaviour(
        epochs=[a.malicious_epochs if m else cfg.training.local_epochs for m in trains.tolist()],
        lr_multipliers=torch.where(trains, a.malicious_lr_multiplier * (1 - anomaly), 1.0),
        update_scale=torch.where(attackers & attack.boosted, a.boost, 1.0),
        attackers=attackers,
        pull=torch.where(attackers, 2 * anomaly, 0.0) if anomaly > 0 else None,
    )


def sampled_size(cfg: Config) -> int | None:
    """The users of a round under ``users.per_round`` (None: everyone takes part)."""
    size = round_size(cfg.users.per_round, cfg.users.num_users)
    return size if size < cfg.users.num_users else None


def root_size(cfg: Config, arm: str) -> int:
    """The server's root set for the arm's defense (FLTrust's), 0 for the others."""
    name = arm_defense(arm)
    return getattr(cfg.defense, root_defense(name)).root_size if defense_class(name).needs_root_data else 0


def root_defense(name: str) -> str:
    """The defense whose section holds the root set's size: the rule of a composed arm."""
    return name.split("+")[-1]


class DataCache:
    """The clean data of each (data, users, seed, root set), built once per command and shared by
    its arms: each arm poisons a copy of its own (:func:`run_arm`). It keeps the last ``size`` built."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._built: dict[str, FederatedDataModule] = {}

    def get(self, cfg: Config, arm: str) -> FederatedDataModule:
        root = root_size(cfg, arm)
        key = json.dumps([dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.users), cfg.seed, root], sort_keys=True)
        if key not in self._built:
            if len(self._built) >= self.size:
                del self._built[next(iter(self._built))]
            self._built[key] = build_datamodule(cfg, poison=False, root_size=root,
                                                root_key=f"defense.{root_defense(arm_defense(arm))}.root_size")
        return self._built[key]


def make_loop(cfg: Config, arm: str, callbacks: list[Callback] = (), checkpoint: Checkpoint | None = None,
              data: DataCache | None = None) -> core_loop.CollaborativeLoop:
    """The arm's collaborative loop: its users' data (poisoned unless benign), model, defense and every
    setting of ``cfg`` the rounds read."""
    name = arm_defense(arm)
    defense, params = defense_class(name), defense_params(cfg.defense, name)
    attack = make_attack(cfg)
    data = copy.copy((data or DataCache()).get(cfg, arm))  # poisoning replaces the copy's tensors, never the cache's
    attack.setup(data.train_x)
    if arm != "benign":
        poison_users(data, attack)
    torch.manual_seed(cfg.seed)  # the same initial global model in every arm, on every device
    module = build_model(cfg, data)
    return core_loop.CollaborativeLoop(
        module, data, user_behaviour(cfg, attack, data.malicious, arm != "benign"), cfg.training.rounds,
        cfg.training.batch_size, cfg.seed, attack, cfg.protocol,
        callbacks=list(callbacks), faults=cfg.faults, checkpoint=checkpoint,
        device=select_device(cfg.training.device), make_defense=lambda server: defense(params, server),
        root_epochs=cfg.training.local_epochs,
        per_round=sampled_size(cfg), participation=cfg.attack.participation, algorithm=cfg.training.algorithm,
        server_optimizer=cfg.server, eval_every=cfg.training.eval_every,
    )


def run_arm(cfg: Config, arm: str, callbacks: list[Callback] = (), checkpoint: Checkpoint | None = None,
            data: DataCache | None = None) -> ArmResult:
    """Train one arm from scratch (or from ``checkpoint`` when it exists; saved
    after every round) on ``training.device`` and evaluate it (no tracking).
    The clean data comes from ``data`` (built there once) or is built here.
    The returned module is on the CPU."""
    defense = defense_class(arm_defense(arm))
    loop = make_loop(cfg, arm, callbacks, checkpoint, data)
    module, data = loop.module, loop.data
    metrics: dict[str, float | None] = dict(loop.run())
    module.cpu()  # logged and exported with a CPU example input
    metrics["detection_rate"], metrics["false_positive_rate"] = defense_detection_rates(
        defense.flags, loop.defense.flagged, loop.excluded, data.malicious, loop.participants or None)
    detection = {"defense": defense.name, "flags": defense.flags,
                 "malicious_users": data.malicious.nonzero().flatten().tolist(), **loop.defense.report()}
    if getattr(loop.defense, "rewind_rounds", 0):  # a defense with recovery: what it cost
        detection["rounds_retrained"] = loop.rounds_retrained
    if defense.flags == "round":
        detection["excluded_per_round"] = loop.excluded
    if loop.participants:  # under sampling: who took part in each round
        detection["participants_per_round"] = loop.participants
    return ArmResult(arm, metrics, loop.history, detection, module, data.test_x[:1])


def arm_params(cfg: Config, arm: str) -> dict:
    """The config as MLflow params, with only this arm's defense section and the configured attack's
    section (the others do not apply)."""
    own = (*(f"defense.{part}." for part in arm_defense(arm).split("+")), f"attack.{cfg.attack.name}.")
    others = tuple(f"attack.{name}." for name in ATTACKS)
    return {k: v for k, v in cfg.flat().items() if not k.startswith(("defense.", *others)) or k.startswith(own)}
