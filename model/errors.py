"""Domain errors of the model core. The CLI turns them into one-line messages."""


class GencliError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class CheckpointError(GencliError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit its tokenizer."""


class TokenizerError(GencliError):
    """A tokenizer cannot be loaded, or an id is outside its vocabulary."""


class ContextOverflowError(GencliError):
    """Prompt plus new tokens do not fit the model's context."""


class DeviceError(GencliError):
    """The requested device is not there."""


class InvalidParameterError(GencliError):
    """A sampling parameter is out of range; param: the one named (the HTTP error's "param")."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
