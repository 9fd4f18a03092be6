"""The one error type every layer raises for bad input."""


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the key."""
