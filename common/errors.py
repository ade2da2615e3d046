"""Errors that are the user's to fix, and how a stage ends on one: a sentence, not a traceback.

A `UserError` carries a message that names the file, row, flag or setting and what to do. A stage calls
`exit_cleanly_on_user_errors()` first thing; an uncaught UserError then ends the process with exit status 1
and `<prefix>: <message>` on stderr (on every rank that hits it, so each rank's launcher output shows it),
without the traceback that would bury it. Anything else still prints its traceback: that is our bug.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem with the user's input, files or settings; the message says what, where and what to do."""

    prefix = "error"


def exit_cleanly_on_user_errors() -> None:
    """Make an uncaught UserError end the process with status 1 and `<prefix>: <message>` on stderr."""
    previous = sys.excepthook
    if getattr(previous, "_user_error_hook", False):
        return

    def hook(exc_type, exc, tb) -> None:
        if issubclass(exc_type, UserError):
            print(f"{exc_type.prefix}: {exc}", file=sys.stderr, flush=True)
        else:
            previous(exc_type, exc, tb)

    hook._user_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
