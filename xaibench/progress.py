"""Progress on stderr that fits the terminal: tqdm bars and one-off messages at most as wide
as ``COLUMNS`` says, else as the terminal on stderr is; written to a file or a CI log (no
terminal, no ``COLUMNS``), lines stay whole."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any

from tqdm.auto import tqdm


def columns() -> int | None:
    """The width to fit in characters: ``COLUMNS``, else the terminal's on stderr, else None."""
    given = os.environ.get("COLUMNS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):  # not a terminal, or no file descriptor
        return None


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar (``kwargs`` as tqdm's) at most ``columns()`` wide."""
    return tqdm(ncols=columns(), **kwargs)


def say(message: str) -> None:
    """A message on stderr, shown even where progress bars are off (pytest -s, CI logs),
    wrapped at spaces to ``columns()`` (a word longer than that, a path say, stays whole)."""
    width = columns()
    if width is not None:
        lines = textwrap.wrap(message, width, break_long_words=False, break_on_hyphens=False)
        message = "\n".join(lines)
    print(message, file=sys.stderr, flush=True)
