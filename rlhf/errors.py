"""Errors caused by what the user gave us (config, data, reward code, checkpoints).

Entry points turn these into one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to change."""


class ConfigError(UserError):
    """An unknown key or an impossible value in the config or on the command line."""


class DataError(UserError):
    """A missing, unreadable or malformed dataset."""


class RewardError(UserError):
    """A reward function that cannot be loaded, raised, or returned bad values."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or incompatible with the run."""


class TrainingDiverged(UserError):
    """Too many optimizer steps in a row with a non-finite loss, gradient or updated weights (settings to change)."""


class RewardUnavailable(RewardError):
    """A reward call that failed as a whole (an unreachable server, a timeout): no sample is to
    blame, so the samples are not re-scored one by one to find one."""
