"""The defense interface: a server-side rule over one round's :class:`Uploads`.

A defense is a small class: its parameters are a dataclass (``Params``) that
validates itself, its math lives in pure tensor functions in the same file,
and :meth:`Defense.aggregate` wires the two together. A defense sees the
uploads and the server-held inputs it declares, never the users' data nor
who is malicious.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import numpy as np
from pipeline.lazy import torch

from pipeline.core.errors import ConfigError, check, finite_number  # noqa: F401 (the plug-ins import them from here)
from pipeline.core.server import Aggregate, ServerInputs, Uploads


@dataclasses.dataclass
class DefenseParams:
    """Base of a defense's parameters (subclass it as a dataclass)."""

    # fields added after results were recorded, with the values that behave as before they existed: while
    # every one holds that value they are left out of a cell's key (grid.cell_config), so the recorded
    # results of the same behaviour are still found; any other value keys them all
    unkeyed_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, key: str) -> None:
        """Raise :class:`ConfigError` naming ``key.<field>`` for a bad value; ``key`` is ``defense.<name>``.
        NaN and +-inf in a float field are refused after it, for every plug-in (:func:`check_finite_fields`)."""


def whole_number(value: Any) -> bool:
    """An integer as YAML gives it (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_finite_fields(params: Any, key: str) -> None:
    """``"<key>.<field>: must be a finite number, got nan"`` for the first float field of the dataclass
    ``params`` that holds NaN or +-inf: the validation path runs it after every plug-in's own rules."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        check(not isinstance(value, float) or math.isfinite(value), f"{key}.{f.name}", "must be a finite number", value)


def sort_columns(x: torch.Tensor) -> torch.Tensor:
    """``x.sort(0).values``: each column ascending, NaN last. On the CPU through
    numpy's vectorised sort (9x faster than torch's on 30 x 109,386 here); the same values."""
    if x.device.type != "cpu":
        return x.sort(0).values
    return torch.from_numpy(np.sort(x.numpy(), axis=0))


def argsort_columns(x: torch.Tensor) -> torch.Tensor:
    """``x.argsort(dim=0, stable=True)`` (ties: the lower row first); on the CPU through numpy's stable sort."""
    if x.device.type != "cpu":
        return x.argsort(dim=0, stable=True)
    return torch.from_numpy(np.argsort(x.numpy(), axis=0, kind="stable"))


class Defense:
    """Base class of the server-side defenses.

    Class attributes a defense sets:

    - ``name``: its registry name (the arm name and the config section ``defense.<name>``);
    - ``summary``: one line for ``auror defenses``;
    - ``Params``: its parameters dataclass (a :class:`DefenseParams`);
    - ``flags``: how its detection rate is read: ``"none"`` (a robust
      aggregator that excludes nobody: DR and FPR are ``-``), ``"round"``
      (it leaves users out round by round: DR / FPR averaged over rounds),
      ``"run"`` (it flags users once and for all, as AUROR: DR / FPR of its
      final flags; the defense keeps them in :attr:`flagged`);
    - ``handles_missing``: it aggregates partial uploads (DSSGD masking,
      ``protocol.theta_u < 1``) correctly; the others are refused for such a config;
    - ``needs_root_data``: it reads ``ServerInputs.root_update`` (a clean root
      set held by the server, ``Params.root_size`` samples);
    - ``search_ranges``: what ``auror tune --kind defense --defense <name>`` searches;
    - ``pre_aggregator``: it maps the round's whole updates to other rows (:meth:`transform`) for a
      rule to aggregate, and is an arm only in front of one, ``<pre>+<rule>``
      (:mod:`pipeline.defenses.compose`);
    - ``composable``: a rule a pre-aggregator may feed (its rows need not be one user each: it keeps
      no state per user and its weights are no user's flags).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    flags: ClassVar[Literal["none", "round", "run"]] = "round"
    handles_missing: ClassVar[bool] = False
    needs_root_data: ClassVar[bool] = False
    # the float parameters an Optuna defense study searches: field -> (low, high, log scale); empty: none
    search_ranges: ClassVar[dict[str, tuple[float, float, bool]]] = {}
    pre_aggregator: ClassVar[bool] = False
    composable: ClassVar[bool] = False

    def __init__(self, params: DefenseParams, server: ServerInputs) -> None:
        self.params = params
        self.server = server
        self.flagged: set[int] = set()  # flags="run": the users flagged so far

    def aggregate(self, uploads: Uploads) -> Aggregate:
        raise NotImplementedError

    def transform(self, updates: torch.Tensor, round_: int) -> torch.Tensor:
        """A pre-aggregator's rows for the rule, from the round's whole updates ``(n, P)``."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """What the run's ``detection.json`` records of this defense (JSON-able)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as if never stopped (tensors, lists, dicts, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @classmethod
    def check_config(cls, params: DefenseParams, cfg, key: str) -> None:
        """Rules across config sections, after ``params.validate(key)``: a defense that
        needs whole updates is refused under DSSGD masking (``protocol.theta_u < 1``)."""
        if cls.handles_missing or cfg.protocol.theta_u == 1:
            return
        from pipeline.defenses import REGISTRY

        partial = ", ".join(name for name, d in REGISTRY.items() if d.handles_missing)
        check(False, "protocol.theta_u", f"must be 1 for defense {cls.name} (it needs whole updates; "
              f"{partial} take partial uploads)", cfg.protocol.theta_u)

    @classmethod
    def search_space(cls, trial, cfg) -> list[str]:
        """An Optuna trial's choice of this defense's parameters (``search_ranges``), as ``--set``
        overrides ``defense.<name>.<field>=<value>``."""
        key = f"defense.{cls.name}"
        return [f"{key}.{field}={trial.suggest_float(f'{key}.{field}', low, high, log=log)!r}"
                for field, (low, high, log) in cls.search_ranges.items()]

    @classmethod
    def warmup_rounds(cls, params: DefenseParams, cfg) -> int:
        """Rounds before which an Optuna trial must not be pruned (a detector's window)."""
        return 1
