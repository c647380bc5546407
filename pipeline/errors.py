"""Errors that stop a job for a reason that is not one row's.

A row's own problem never raises: it becomes that row's `error` (see `pipeline.rows`). What
raises is what no row can get past: a dead engine, an input file gone since planning, a full
disk. The job then stops with the reason, and its committed rows stay, so rerunning the same
command resumes it.
"""

from __future__ import annotations


class JobFailure(RuntimeError):
    """The job cannot go on; its output folder is left resumable."""


def find_failure(exc: BaseException) -> JobFailure | None:
    """The `JobFailure` behind `exc`, however Ray wrapped it (task and actor errors keep the
    original as `cause` or as the exception's `__cause__`)."""
    found, seen, item = None, set(), exc
    # Follow the chain to its end: Ray's wrapper is itself an instance of the original's class
    # (with a traceback for a message), and the original further down says just the reason.
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, JobFailure):
            found = item
        item = getattr(item, "cause", None) or item.__cause__ or item.__context__
    return found
