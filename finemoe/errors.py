"""User-facing errors: the CLI turns these into a one-line message and exit code 2."""


class FinemoeError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix."""


class ConfigError(FinemoeError, ValueError):
    """An invalid model, training or sweep configuration."""


class DataError(FinemoeError):
    """Missing, empty or unusable data."""
