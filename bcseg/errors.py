"""Exceptions that the command line turns into exit codes."""


class BadInputError(Exception):
    """An input the user can fix: a slide, an option or a checkpoint.

    The message names the file or option, what is wrong and what to do. The command line
    prints it without a traceback and exits with code 2.
    """
