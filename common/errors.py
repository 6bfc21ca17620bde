"""The project's error types: every rejection of user or network input is one of these."""


class MVLDError(Exception):
    """Base class for every error MVLD raises on purpose."""


class ProtocolError(MVLDError):
    """A wire message was rejected: malformed, oversized, wrong type, or wrong version."""


class ConfigError(MVLDError):
    """A command-line flag, config file or key file is invalid."""


class DatasetError(MVLDError):
    """A dataset folder or file is invalid; the message names the offending file."""
