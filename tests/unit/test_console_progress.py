"""The generation job's progress bar (pipeline.generate.stats) and the quiet console
(pipeline.console), without an engine."""

from __future__ import annotations

import io
import logging
import re
import sys

import pyarrow as pa
import pytest

from pipeline.console import JobConsole
from pipeline.generate.stats import STEADY_AFTER_S, RunStats


def batch(n: int, tokens: int = 10, errors: int = 0) -> pa.Table:
    return pa.table({
        "error": [None] * (n - errors) + ["engine error: x"] * errors,
        "prompt_tokens": [5] * n,
        "completion_tokens": [tokens] * n,
        "finish_reason": ["length"] * n,
        "tool_parse": [None] * n,
    })


def drawn_counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+)/\d+ rows", text)]


def test_the_bar_redraws_on_every_committed_batch():
    stats, out = RunStats(total_rows=40), io.StringIO()
    with stats.progress(file=out) as progress:
        for _ in range(5):
            stats.add(batch(8))
            progress.update(stats)
    counts = drawn_counts(out.getvalue())
    for n in (8, 16, 24, 32, 40):
        assert n in counts, counts
    assert "rows/s" in out.getvalue() and "tok/s" in out.getvalue() and "ETA" in out.getvalue()


def test_resumed_rows_start_the_bar_and_stay_out_of_the_speed():
    stats = RunStats(total_rows=20)
    stats.add(batch(10, tokens=100), resumed=True)
    assert stats.rates() is None and stats.timeline == []
    assert "waiting for the first batch" in stats.postfix()
    stats.add(batch(5))
    stats.started -= 2.0  # this run has been going for about two seconds
    rows_s, tokens_s = stats.rates()
    assert 2.0 <= 5 / rows_s <= 3.0 and tokens_s == pytest.approx(rows_s * 10)
    assert stats.timeline[-1][1:] == (5, 50)


def test_the_speed_is_measured_from_the_first_batch_once_it_is_steady():
    stats = RunStats(total_rows=100)
    stats.started -= 60.0  # the engines took a minute to start
    stats.add(batch(10))
    stats.timeline[0] = (60.0, 10, 100)
    stats.add(batch(10))
    stats.started -= STEADY_AFTER_S  # ten more seconds pass
    rows_s, _ = stats.rates()
    assert abs(rows_s - 1.0) < 0.1  # 10 rows in 10 s since the first batch, not 20 in 70 s
    assert "ETA 01:" in stats.postfix()  # 80 rows at 1 row/s


def test_the_timeline_stays_bounded():
    stats = RunStats(total_rows=10**6)
    for _ in range(5000):
        stats.add(batch(1))
    assert len(stats.timeline) <= 2000 and stats.timeline[-1][1] == 5000 and stats.timeline[0][1] == 1


def test_quiet_console_sends_everything_but_the_jobs_own_words_to_the_log_file(tmp_path, capsys):
    log_file = tmp_path / "logs" / "job.log"
    terminal = logging.StreamHandler(sys.stderr)  # what Hydra's console handler is
    logging.getLogger().addHandler(terminal)
    try:
        with JobConsole(str(log_file)) as console:
            logging.getLogger("pipeline.generate.job").info("settings: a lot of them")
            logging.getLogger("pipeline.generate.job").warning("the adapter is stale")
            logging.getLogger("ray.data").warning("Progress bars disabled")
            print("(MapWorker pid=1) vLLM worker line")
            print("a worker's stderr line", file=sys.stderr)
            console.print("done: 3 rows")
        shown = capsys.readouterr()
        # everything is as it was after the job
        logging.getLogger("pipeline.x").warning("after")
        assert "after" in capsys.readouterr().err
    finally:
        logging.getLogger().removeHandler(terminal)
    assert shown.out == ""
    assert shown.err == "WARNING: the adapter is stale\ndone: 3 rows\n"
    kept = log_file.read_text()
    for line in ("settings: a lot of them", "the adapter is stale", "vLLM worker line", "a worker's stderr line"):
        assert line in kept
    assert console.log_file == str(log_file)
    assert terminal.level == logging.NOTSET


def test_verbose_console_keeps_the_terminal_and_still_writes_the_log_file(tmp_path, capsys):
    log_file = tmp_path / "job.log"
    with JobConsole(str(log_file), verbose=True):
        logging.getLogger("pipeline.generate.job").info("settings: a lot of them")
        print("a worker line")
    assert "a worker line" in capsys.readouterr().out
    assert "settings: a lot of them" in log_file.read_text()


def test_a_workers_own_info_lines_go_to_its_stderr_once(capsys):
    """The job's workers' setup hook: their pipeline.* INFO lines on stderr (Ray forwards them to
    the job's log), once however often the hook runs, and nothing of other loggers."""
    from pipeline.console import worker_log_lines

    logger = logging.getLogger("pipeline")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        worker_log_lines()
        worker_log_lines()
        logging.getLogger("pipeline.generate.engine").info("engine ready in %.1fs", 7.8)
        logging.getLogger("somelibrary").info("not ours")
        err = capsys.readouterr().err
        assert re.fullmatch(r"\[[\d\- :,]+\]\[pipeline\.generate\.engine\]\[INFO\] - engine ready in 7\.8s\n", err), err
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
