"""Errors a user can act on. The CLI prints them as one line and exits non-zero, without a traceback."""


class RaysynthError(Exception):
    """Base class for every error the CLI reports as a single line."""


class InputError(RaysynthError, ValueError):
    """Bad input data: a missing, empty, corrupt or inconsistent file or folder. Names the file or the cause."""


class StageError(RaysynthError, RuntimeError):
    """A stage cannot run: a previous stage's artifact is missing or was made with another config."""


class PrivacyGateError(RaysynthError):
    """Synthetic data failed the memorisation gate (too many near-copies of training images)."""
