"""The errors every layer raises for what the command line reports in one line, and the checks that raise them."""

import math
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the key."""


def check(ok: bool, key: str, message: str, value: Any) -> None:
    """One-line :class:`ConfigError` ``"<key>: <message>, got <value>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}, got {value!r}")


def finite_number(value: Any) -> bool:
    """A real number as YAML gives it (int or float, not a bool), not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(value: float) -> bool:
    """A finite number > 0 (NaN and inf are not)."""
    return 0 < value < float("inf")


class CellsFailed(RuntimeError):
    """Some cells of a sweep raised; their errors are in the sweep's table (exit 1)."""
