"""The error hierarchy. Messages say what is wrong, where, and what to do."""


class IhldError(Exception):
    """Base of every error ihld raises on purpose."""


class ConfigError(IhldError):
    """The config file is invalid; the message names the file and the key."""


class JobError(IhldError):
    """A job file or job line is invalid; the message names the field path or line."""

    def __init__(self, message: str, *, kind: str = "invalid_job", path: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


class PluginError(IhldError):
    """A plugin failed to load or registered something invalid."""


class SpoolError(IhldError):
    """The spool directory cannot be used (permissions, lock held by another daemon)."""


class StageError(IhldError):
    """A stage failed; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool = True, kind: str = "stage_error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind
