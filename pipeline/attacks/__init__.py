"""Attacks, one module each, found by name in :data:`REGISTRY` (``attack.name``).

Adding an attack: a module in this package with an :class:`~pipeline.attacks.base.Attack`
subclass decorated with :func:`register`, its section ``attack.<name>`` in
``params.yaml``, and its test. Every module here is imported on first use of
the package, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.attacks.base import Attack

REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` available as ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two attacks named {cls.name!r}: {REGISTRY[cls.name].__module__} and {cls.__module__}")
    REGISTRY[cls.name] = cls
    return cls


for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # a stable order everywhere
    if _module.name not in ("base",):
        importlib.import_module(f"{__name__}.{_module.name}")

REGISTRY = dict(sorted(REGISTRY.items()))
