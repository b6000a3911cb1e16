"""The data layer's user-facing error (the CLI and `train` report it in one line, exit 2)."""


class DataError(ValueError):
    """Bad input under --strict, or an input the user must fix."""
