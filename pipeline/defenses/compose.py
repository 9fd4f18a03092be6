"""Composed arms: pre-aggregators in front of a rule, written ``<pre>+...+<rule>`` (``nnm+median``,
``bucketing+krum``, ``bucketing+nnm+trimmed_mean``).

Every round, the whole updates go through each pre-aggregator in turn
(:meth:`~pipeline.defenses.base.Defense.transform`), and the rule aggregates the rows that come
out. Each part reads its own config section (``defense.nnm``, ``defense.median``). The rule must
be ``composable``: it keeps no state per user, since a row is no longer one user's. For the same
reason a composed arm flags nobody: its DR / FPR are ``-``.
"""

from __future__ import annotations

import functools
from typing import Any

from pipeline.lazy import torch

from pipeline.core.errors import ConfigError
from pipeline.core.server import Aggregate, ServerInputs, Uploads, complete_rows
import pipeline.defenses as defenses  # its REGISTRY, looked up when used: complete and sorted by then
from pipeline.defenses.base import Defense


def composed_parts(name: str) -> list[str]:
    """The parts of a composed arm's name, checked: pre-aggregators, then one composable rule."""
    *pres, rule = name.split("+")
    pre_names = ", ".join(n for n, d in defenses.REGISTRY.items() if d.pre_aggregator)
    rules = ", ".join(n for n, d in defenses.REGISTRY.items() if d.composable)
    for pre in pres:
        if pre not in defenses.REGISTRY or not defenses.REGISTRY[pre].pre_aggregator:
            raise ConfigError(f"{name}: {pre!r} is not a pre-aggregator ({pre_names})")
    if rule not in defenses.REGISTRY or not defenses.REGISTRY[rule].composable:
        raise ConfigError(f"{name}: {rule!r} is not a rule a pre-aggregator can feed ({rules})")
    return [*pres, rule]


@functools.cache
def composed(name: str) -> type[Defense]:
    """The defense of the arm ``name`` (``<pre>+<rule>``); its params are ``{part: that part's params}``."""
    parts = composed_parts(name)
    rule = defenses.REGISTRY[parts[-1]]

    class Composed(Defense):
        __doc__ = f"{' then '.join(parts)}: the rule {parts[-1]} over the pre-aggregated rows."
        flags = "none"
        needs_root_data = rule.needs_root_data

        def __init__(self, params: dict[str, Any], server: ServerInputs) -> None:
            super().__init__(params, server)
            self.parts = [defenses.REGISTRY[part](params[part], server) for part in parts]

        def aggregate(self, uploads: Uploads) -> Aggregate:
            updates = uploads.updates
            rows = updates[complete_rows(updates)]
            if len(rows) == 0:
                return Aggregate(torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device))
            for pre in self.parts[:-1]:
                rows = pre.transform(rows, uploads.round)
            step = self.parts[-1].aggregate(Uploads(uploads.round, torch.arange(len(rows)), rows)).step
            return Aggregate(step)

        @classmethod
        def check_config(cls, params: dict[str, Any], cfg, key: str) -> None:
            super().check_config(params, cfg, key)  # whole updates: the pre-aggregators mix vectors
            for part in parts:
                defenses.REGISTRY[part].check_config(params[part], cfg, f"defense.{part}")

        def state_dict(self) -> dict[str, Any]:
            return {"rule": self.parts[-1].state_dict()}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.parts[-1].load_state_dict(state.get("rule", {}))

    Composed.name = name
    Composed.summary = f"{' then '.join(parts)}"
    Composed.__name__ = Composed.__qualname__ = "Composed_" + "_".join(parts)
    return Composed


def defense_class(name: str) -> type[Defense]:
    """The registered defense ``name``, or the composed one ``<pre>+<rule>``."""
    return composed(name) if "+" in name else defenses.REGISTRY[name]


def defense_params(cfg_defense: Any, name: str) -> Any:
    """The params of the defense ``name`` from the config's ``defense`` section (a composed arm: each part's)."""
    if "+" not in name:
        return getattr(cfg_defense, name)
    return {part: getattr(cfg_defense, part) for part in composed_parts(name)}
