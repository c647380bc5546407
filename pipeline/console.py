"""What a job shows on the terminal, and what goes to its log file only.

A job's terminal output is for the person who started it: the job's start line, its progress,
the warnings the job itself raises for them (`pipeline.*` loggers) and its summary. Everything
else (the resolved settings, INFO logs, Ray's and vLLM's worker lines, library warnings) goes to
the job's log file, whose path the summary names. `verbose=True` leaves the terminal as it was:
everything on it, as well as in the log file.

The log file is the one Hydra's job logging writes when a job's config keeps Hydra's file logging;
otherwise `JobConsole` opens `default_log_file` itself (the generation job's
`<output.path>/logs/generate.log`: its config sends Hydra's logging to stdout only, so that the file
appears once the job's checks have passed and a refused job writes nothing).

How: while the job runs, the handlers that write log records to the terminal are muted, one
handler on the root logger sends the job's own warnings to the terminal, and `sys.stdout` and
`sys.stderr` point at the log file, so what Ray's driver prints for its workers (it prints to
whatever `sys.stderr` is at the time) lands there. The terminal stays reachable as `terminal`.

Pure module: standard library only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# Above every level: a muted handler lets nothing through.
_MUTED = logging.CRITICAL + 10
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class JobConsole:
    """`with JobConsole(log_file, verbose) as console:` around a job; `console.print` writes to
    the terminal, `console.log_file` is where the rest went."""

    def __init__(self, default_log_file: str, verbose: bool = False, own_loggers: str = "pipeline"):
        self.default_log_file = default_log_file
        self.verbose = verbose
        self.own_loggers = own_loggers
        self.terminal: TextIO = sys.stderr
        self.log_file: str | None = None
        self._undo: list = []

    def print(self, text: str) -> None:
        print(text, file=self.terminal, flush=True)

    def __enter__(self) -> JobConsole:
        self.terminal = sys.stderr
        root = logging.getLogger()
        # Hydra's job log is a plain FileHandler on the root logger (pytest's own log file
        # handler is a subclass, and not the job's).
        existing = [h for h in root.handlers if type(h) is logging.FileHandler]
        if existing:
            self.log_file = existing[0].baseFilename
            file_handler = existing[0]
        else:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.default_log_file)), exist_ok=True)
                file_handler = logging.FileHandler(self.default_log_file, encoding="utf-8")
            except OSError:
                # No log file (an output path that cannot hold one is the job's to report):
                # keep everything on the terminal rather than lose it.
                return self
            file_handler.setFormatter(logging.Formatter(_FORMAT))
            self._undo.append(file_handler.close)
            self._add_handler(root, file_handler)
            self.log_file = file_handler.baseFilename
        if root.level == logging.NOTSET or root.level > logging.INFO:
            self._set(root, "level", logging.INFO, root.setLevel)
        if self.verbose:
            return self
        stream = open(self.log_file, "a", buffering=1, encoding="utf-8", errors="replace")
        self._undo.append(stream.close)
        # Ray's loggers keep their records to themselves (and ray.data logs at DEBUG): the log
        # file gets their INFO and above through a handler of its own.
        copy = logging.StreamHandler(stream)
        copy.setLevel(logging.INFO)
        copy.setFormatter(logging.Formatter(_FORMAT))
        for logger in _loggers():
            for handler in list(logger.handlers):
                if _writes_to_terminal(handler):
                    self._set(handler, "level", _MUTED, handler.setLevel)
                    if not logger.propagate and logger is not root and copy not in logger.handlers:
                        self._add_handler(logger, copy)
        if _fd(self.terminal) == 2:
            self._redirect_fds(stream)
        own = logging.StreamHandler(self.terminal)
        own.setLevel(logging.WARNING)
        own.addFilter(lambda r: r.name == self.own_loggers or r.name.startswith(self.own_loggers + "."))
        own.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        self._add_handler(root, own)
        for name in ("stdout", "stderr"):
            self._set(sys, name, stream, lambda v, n=name: setattr(sys, n, v))
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception:  # restoring the terminal must not hide the job's own exception
                pass
        self._undo = []

    def _redirect_fds(self, stream: TextIO) -> None:
        """Point file descriptors 1 and 2 at the log file too: Ray's core and other native code
        write there directly. The terminal is kept on a copy of descriptor 2."""
        encoding = getattr(self.terminal, "encoding", None) or "utf-8"
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=encoding, errors="replace")
        self._undo.append(terminal.close)
        for fd in (1, 2):
            saved = os.dup(fd)
            for stdio in (sys.stdout, sys.stderr):
                stdio.flush()
            os.dup2(stream.fileno(), fd)
            self._undo.append(lambda fd=fd, saved=saved: (os.dup2(saved, fd), os.close(saved)))
        self.terminal = terminal

    def _set(self, obj, attr: str, value, setter) -> None:
        old = getattr(obj, attr)
        setter(value)
        self._undo.append(lambda: setter(old))

    def _add_handler(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._undo.append(lambda: logger.removeHandler(handler))


def _loggers() -> list[logging.Logger]:
    found = [logging.getLogger()]
    found += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return found


def _fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, a StringIO
        return None


def _writes_to_terminal(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def worker_log_lines(own_loggers: str = "pipeline") -> None:
    """In a Ray worker of the job: its own INFO lines (vLLM's import and the engine's start, the
    first batch's answer) on the worker's stderr, which Ray sends to the driver and the driver to
    the job's log file, so that the log holds the worker's side of the job's timeline. A Ray
    worker's root logger passes warnings only. The job names this as its workers' setup hook
    (`pipeline.generate.ray_session.start_ray`) when it joins a running Ray; in a Ray the job starts, the
    engine and prepare tasks call it themselves."""
    logger = logging.getLogger(own_loggers)
    if any(getattr(h, "_job_worker_lines", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._job_worker_lines = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not twice, should the worker's root logger write to stderr too
