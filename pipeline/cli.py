"""Shared behaviour of the entry points."""

from __future__ import annotations

import contextlib
import sys

from pipeline.config import ConfigError
from pipeline.planning import InputError
from pipeline.sinks import OutputError

USER_ERRORS = (ConfigError, InputError, OutputError)


@contextlib.contextmanager
def exit_on_user_error():
    """A bad config, input or output folder is the user's to fix: say what, without a traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
