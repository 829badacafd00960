"""Every error recjax raises for a person to fix; the CLI prints these without a traceback.

Each message says what was wrong, where (the config key, file or step), and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message alone tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and a valid value."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (and line) and what was wrong."""


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint's tree or shapes do not match the model being trained."""


class RunDirError(UserError, ValueError):
    """The run directory holds a run that this command would overwrite or could not continue."""


class NoCheckpointError(UserError, FileNotFoundError):
    """A command that needs a checkpoint found none."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step."""


class DistributedError(UserError, ValueError):
    """A multi-process set-up that cannot work (addresses, ids, timeouts)."""


class LaunchError(UserError, ValueError):
    """A launch request that cannot work; the message says what to change."""
