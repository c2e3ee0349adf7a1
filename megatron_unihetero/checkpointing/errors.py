"""The package's one checkpoint error."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, does not fit this model or this
    engine, or could not be written; the message names the file or folder. pretrain exits with
    code 4 on it; the tools print it without a traceback."""
