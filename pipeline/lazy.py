"""Modules imported on their first use, not at start-up.

The config, the plug-in registries and the CLI's own modules write ``from pipeline.lazy import torch`` where
other modules write ``import torch``: the name stands for the module, and the first attribute read
(``torch.zeros``) imports it (1.5 s here). So ``auror --help``, ``auror defenses``, ``auror attacks`` and every
refusal of a bad config or name answer before torch, Lightning or MLflow load (``tests/test_startup.py``,
``benchmarks/bench_startup.py``). Nothing is put in ``sys.modules`` ahead of time: the import, when it comes,
is the ordinary one.
"""

from __future__ import annotations

import importlib
from typing import Any


class OnFirstUse:
    """Stands for the module ``name``; reading an attribute imports it (once) and reads the module's."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module = None

    def __getattr__(self, attr: str) -> Any:  # only for names not set in __init__
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use{'' if self._module is None else ' (imported)'}>"


torch = OnFirstUse("torch")
sqlalchemy = OnFirstUse("sqlalchemy")
