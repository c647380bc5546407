"""The errors a job stops with, in two kinds, and never for one row's sake.

A row's own problem never raises: it becomes that row's `error` (see `pipeline.generate.prepare`).

- `UserError`: the user's to fix (a setting, an input file, the output folder, an adapter
  name). Raised before anything is written, with every problem found, each naming the setting or
  path and the fix. Entry points print it without a traceback (`pipeline.cli`).
- `JobFailure`: what no row can get past once the job runs (an engine that cannot start, an
  input file gone since planning, a full disk). The job stops with the reason; its committed rows
  stay, so rerunning the same command resumes it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user fixes in the config, the inputs or the output folder. `problems` holds
    one line per problem; the message lists them all."""

    def __init__(self, problems: list[str] | str, heading: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = self.problems[0] if len(self.problems) == 1 and heading is None else "\n".join(
            f"- {p}" for p in self.problems
        )
        super().__init__(f"{heading}\n{lines}" if heading else lines)


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
