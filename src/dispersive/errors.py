"""Errors that the command line shows as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, files, arguments) and how to fix it.

    The CLI prints ``error: <message>`` and exits with status 2. Library functions raise
    ``ValueError``/``TypeError`` for bad arguments; the CLI shows those as one line too.
    """
