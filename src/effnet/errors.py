class EffnetError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""
