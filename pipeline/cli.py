"""What every entry point does with the errors a job stops with (see `pipeline.errors`)."""

from __future__ import annotations

import contextlib
import sys

from pipeline.errors import JobFailure, UserError


@contextlib.contextmanager
def exit_on_user_error():
    """A bad config, input, output folder or adapter name is the user's to fix: say what, without
    a traceback (exit 2). A job that had to stop (an engine that cannot start) says why and that a
    rerun resumes (exit 1). Anything else is a bug, and keeps its traceback."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except JobFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
