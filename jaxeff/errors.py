"""User-facing errors: the CLI prints their message on one line and exits with ``exit_code`` (2
unless the class says otherwise)."""


class JaxeffError(Exception):
    """A mistake in the user's input (config, files, shapes); the message names the field and what was expected."""

    exit_code = 2


class ConfigError(JaxeffError):
    pass


class DataError(JaxeffError):
    pass


class CheckpointError(JaxeffError):
    pass


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read or fail their checksums (not one that merely belongs
    to another configuration)."""


class DiskFullError(CheckpointError):
    """A checkpoint could not be written for lack of disk space; the earlier checkpoints are intact."""

    exit_code = 4
