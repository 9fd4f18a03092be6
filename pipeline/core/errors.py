"""The errors every layer raises for what the command line reports in one line."""


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the key."""


class CellsFailed(RuntimeError):
    """Some cells of a sweep raised; their errors are in the sweep's table (exit 1)."""
