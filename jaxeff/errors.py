"""User-facing errors: the CLI prints their message on one line and exits with code 2."""
class JaxeffError(Exception):
    """A mistake in the user's input (config, files, shapes); the message names the field and what was expected."""
class ConfigError(JaxeffError):
    pass
class DataError(JaxeffError):
    pass
class CheckpointError(JaxeffError):
    pass
