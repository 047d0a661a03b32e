"""Errors a user can fix, and how the ``llip`` command shows them.

:class:`UsageError` (and :class:`DataError`) carry a message meant to be read on its own: the command prints it as
one line, ``llip <command>: error: <message>``, and exits with status 2, without a traceback. Everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class UsageError(Exception):
    """What was asked cannot be done as asked (an argument, a file, a folder, a checkpoint); the message says what
    and how to fix it."""


class DataError(UsageError):
    """The training data cannot feed the run: no readable samples, or none where some were expected."""


_WORKER_PREFIX = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): ")


def error_line(exc: BaseException) -> str:
    """``exc`` as one line. An exception re-raised by a ``DataLoader`` worker carries the worker's traceback in its
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its last line, without
    the class name, is the message."""
    text = str(exc).strip() or type(exc).__name__
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = _WORKER_PREFIX.sub("", last)
    return " ".join(text.split())
