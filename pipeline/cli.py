"""Shared behaviour of the entry points."""

from __future__ import annotations

import contextlib
import sys

from pipeline.config import ConfigError
from pipeline.errors import JobFailure
from pipeline.planning import InputError
from pipeline.sinks import OutputError

USER_ERRORS = (ConfigError, InputError, OutputError)


@contextlib.contextmanager
def exit_on_user_error():
    """A bad config, input or output folder is the user's to fix: say what, without a traceback.
    A job that had to stop (an engine that cannot start) says why, and that a rerun resumes."""
    try:
        yield
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except JobFailure as exc:  # not the user's input: the job stopped, its output resumable
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
