"""Server-side defenses, one module each, found by name in :data:`REGISTRY`.

Adding a defense: a module in this package with a :class:`~pipeline.defenses.base.Defense`
subclass decorated with :func:`register`, its section ``defense.<name>`` in
``params.yaml``, and its test. Every module here is imported on first use of
the package, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.defenses.base import Defense

REGISTRY: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make ``cls`` available as ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two defenses named {cls.name!r}: {REGISTRY[cls.name].__module__} and {cls.__module__}")
    REGISTRY[cls.name] = cls
    return cls


for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # a stable order everywhere
    if _module.name not in ("base",):
        importlib.import_module(f"{__name__}.{_module.name}")

# by name, whatever order the modules imported each other in
REGISTRY = dict(sorted(REGISTRY.items()))
