"""Exceptions that the command line turns into exit codes."""

from __future__ import annotations


class BadInputError(Exception):
    """An input the user can fix: a slide, an option or a checkpoint.

    The message names the file or option, what is wrong and what to do. The command line
    prints it without a traceback and exits with code 2.
    """


class TileDecodeError(BadInputError):
    """Stored pixels of a slide that fail to decode, such as a corrupt JPEG or JPEG 2000 tile.

    ``l0_box`` is the region that failed, ``(x, y, width, height)`` in level-0 pixels.
    """

    def __init__(self, message: str, l0_box: tuple[int, int, int, int]):
        super().__init__(message)
        self.l0_box = l0_box
