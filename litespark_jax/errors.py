"""Errors that are the user's to fix.

Every exception defined here carries a message that names what is wrong and where. The CLI entry points catch
``UserError`` and print ``error: <message>`` on one line with exit code 2, never a traceback.
"""


class UserError(Exception):
    """Base class: bad input from the user (config, CLI flag, data, checkpoint, tokenizer, HF directory)."""


class ConfigError(UserError):
    """A configuration value, file or CLI override is invalid."""


class DataError(UserError):
    """A data file, shard or tokenizer cannot be used."""


class CheckpointError(UserError):
    """A checkpoint directory is missing, corrupted or does not match the model."""


class NumericalError(UserError):
    """Training stopped on a non-finite loss/gradient or recurring loss spikes (``train.on_nonfinite``, ``on_spike``)."""
