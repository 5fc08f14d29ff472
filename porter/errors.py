"""Errors porter reports to the user as one line, without a traceback."""


class PorterError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""
