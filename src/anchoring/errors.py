"""The one exception type users see: the CLI prints its message on one line, no traceback."""


class AnchoringError(ValueError):
    """A problem with the user's input (config, schedule, run directory...).

    Raised *before* anything is written, so a bad command leaves no half-made run behind.
    """


class UnfinishedRunWarning(UserWarning):
    """`load_run` opened a run still in training (or stopped before its end): its models are those of
    its last checkpoint, not the trained ones, and it has no summary yet."""
