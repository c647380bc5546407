"""The generation report (pipeline.generate.report) and the shared page (pipeline.report_html),
built from output folders written here: no engine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.generate.report import REPORT, build_report, error_kinds, read_output, sample_rows, write_report
from pipeline.report_html import Section, Table, bar_chart, render_page

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "<script>document.title='pwned'</script>"


def output_row(i: int, **kw) -> dict:
    row = {"id": f"in.parquet#{i}", "response": f"answer {i}", "tool_calls": [], "prompt_tokens": 10 + i,
           "completion_tokens": 5 + i, "finish_reason": "length" if i % 2 else "stop", "error": None, "seed": i,
           "lora": None, "tool_parse": None, "source_file": "in.parquet", "source_row": i}
    row.update(kw)
    if row["error"] is not None:
        row.update(response=None, prompt_tokens=0, completion_tokens=0, finish_reason=None)
    return row


def write_output(folder: Path, parts: list[list[dict]], manifest: dict | None = None, settings: dict | None = None):
    (folder / "parts").mkdir(parents=True)
    total = sum(len(p) for p in parts)
    config = {"model.name": "tiny", "response_format": (settings or {}).get("response_format")}
    (folder / "job.json").write_text(json.dumps({"fingerprint": {"config": config, "inputs": {"in.parquet": f"{total}:sha256:0"}}}))
    for i, rows in enumerate(parts):
        pq.write_table(pa.Table.from_pylist(rows), folder / "parts" / f"part-{i:05d}.parquet")
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps({"status": "complete", "settings": settings or {}, **manifest}))
    return str(folder)


def rows_of_every_kind() -> list[dict]:
    rows = [output_row(i) for i in range(8)]
    rows[2] = output_row(2, error="invalid request: temperature: must be <= 5 (got 7.5)")
    rows[3] = output_row(3, error=f"invalid request: prompt: {SCRIPT}")
    rows[4] = output_row(4, error="engine error: the engine refused the batch")
    rows[5] = output_row(5, response=SCRIPT, tool_parse="parsed",
                         tool_calls=[{"name": "get_weather", "arguments": '{"city": "Paris"}'}])
    rows[6] = output_row(6, tool_parse="malformed", id=f"id-{SCRIPT}")
    return rows


def test_a_finished_job_page_holds_counts_plots_errors_and_samples(tmp_path):
    rows = rows_of_every_kind()
    out = write_output(tmp_path / "out", [rows[:4], rows[4:]], manifest={
        "counts": {"rows_in": 8}, "wall_time_s": 3.5,
        "throughput": {"rows_per_s": 2.0, "output_tokens_per_s": 20.0, "time_to_first_row_s": 1.0},
        "timeline": {"points": [[1.0, 4, 30], [2.0, 8, 60]]},
    })
    html = Path(write_report(out)).read_text()
    assert Path(out, REPORT).exists()
    assert ">complete<" in html
    # plots: prompt and completion tokens, finish reasons, tool parsing, errors, throughput
    assert html.count("<svg") == 6
    assert "Tool calls parsed" in html and "Errors by stage" in html and "Committed rows over time" in html
    # errors grouped by stage, most rows first, each with the first row's id and message
    assert error_kinds([r["error"] for r in rows], [r["id"] for r in rows]) == [
        ("invalid request", 2, "in.parquet#2", "invalid request: temperature: must be &lt;= 5 (got 7.5)".replace("&lt;", "<")),
        ("engine error", 1, "in.parquet#4", "engine error: the engine refused the batch"),
    ]
    # row text is escaped: the page holds no script element, only its text
    assert "<script" not in html.lower()
    assert "&lt;script&gt;document.title=" in html
    assert "get_weather" in html
    assert "Labels" not in html  # not a labelling job


def test_sample_rows_are_the_first_ok_and_error_rows_and_the_longest_and_shortest(tmp_path):
    rows = rows_of_every_kind()
    out = write_output(tmp_path / "out", [rows])
    picks = sample_rows(read_output(out).rows)
    assert picks == [("ok, shortest", 0, 0), ("ok", 0, 1), ("error", 0, 2), ("error", 0, 3), ("error", 0, 4),
                     ("ok", 0, 5), ("longest", 0, 7)]


def test_a_choice_job_shows_its_label_distribution(tmp_path):
    labels = ["positive", "negative", "positive", "neutral", "positive"]
    rows = [output_row(i, response=label) for i, label in enumerate(labels)]
    settings = {"response_format": {"type": "choice", "choices": ["positive", "negative", "neutral", "mixed"]}}
    html = build_report(write_output(tmp_path / "out", [rows], manifest={}, settings=settings))
    assert "Labels" in html and "a choice of 4 labels" in html
    assert ">mixed<" in html  # a label no row got is shown with 0


def test_an_interrupted_job_is_reported_from_its_parts(tmp_path):
    rows = [output_row(i) for i in range(6)]
    out = write_output(tmp_path / "out", [rows[:3], rows[3:]])
    # job.json and parts only (no manifest): the clock is the parts' commit times
    html = build_report(out)
    assert "incomplete: 6 of 6 rows committed" in html
    assert "No manifest.json yet" in html
    assert "part commit times" in html


def test_an_interrupted_job_before_any_part(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"fingerprint": {"config": {}, "inputs": {"a.parquet": "5:sha256:0"}}}))
    html = build_report(str(out))
    assert "incomplete: 0 of 5 rows committed" in html and "No row committed yet" in html


@pytest.mark.parametrize("make", ["missing", "empty", "damaged manifest", "damaged part"])
def test_a_folder_without_job_output_is_a_user_error_naming_it(tmp_path, make):
    out = tmp_path / "out"
    if make != "missing":
        out.mkdir()
    if make == "damaged manifest":
        (out / "manifest.json").write_text("{not json")
    if make == "damaged part":
        (out / "parts").mkdir()
        (out / "job.json").write_text("{}")
        (out / "parts" / "part-00000.parquet").write_text("not parquet")
    with pytest.raises(UserError) as info:
        write_report(str(out))
    assert str(out) in str(info.value)
    assert not (out / REPORT).exists()


def test_the_command_rebuilds_the_page_and_says_what_is_wrong(tmp_path):
    out = write_output(tmp_path / "out", [[output_row(0)]])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "jobs.report", out], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == os.path.join(out, REPORT)
    bad = subprocess.run([sys.executable, "-m", "jobs.report", str(tmp_path / "nothing")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and str(tmp_path / "nothing") in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_page_escapes_every_text_and_forbids_scripts():
    html = render_page(
        title=f"t {SCRIPT}", status="complete", facts=[("k", SCRIPT)],
        sections=[Section("s", note=SCRIPT, plots=[bar_chart({SCRIPT: 2, "$5 or $10": 1}, "c")],
                          tables=[Table(["a"], [[SCRIPT]], text_columns=["a"])])],
        settings={"nested": {"value": SCRIPT}},
    )
    assert "<script" not in html.lower()
    assert "default-src 'none'" in html  # no script runs, nothing is fetched, whatever the text
    # nothing to fetch: no source or link outside the page (namespace names are not requests)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert html.count("&lt;script&gt;") >= 5
    assert "nested.value" in html


def training_manifest(**more) -> dict:
    return {
        "adapter": "bonjour", "base_model": {"name": "tiny"}, "steps": 3, "epochs_run": 1.0, "train_tokens": 300,
        "tokens_per_second": 100.0, "train_seconds": 3.0, "first_step_loss": 7.5, "train_loss": 2.5,
        "validation_loss": 2.6, "config": {"train": {"lr": 0.005}},
        "data": {"rows": 12, "conversations": 10, "train_examples": 8, "validation_examples": 1,
                 "skipped": {"no assistant turn": 2}, "path": ["data.parquet"]},
        "history": {"step": [1, 2, 3], "loss": [7.5, 4.0, 2.5], "lr": [0.005, 0.003, 0.0],
                    "tokens_per_second": [80.0, 90.0, 100.0]},
        "validation_answers": [{"prompt": "x" * 1000 + "Say hello.", "reference": "Bonjour!", "answer": SCRIPT}],
        **more,
    }


def test_the_training_page_shows_curves_data_counts_and_greedy_answers(tmp_path):
    from pipeline.train.report import REPORT as TRAIN_REPORT, write_report as write_training_report

    (tmp_path / "manifest.json").write_text(json.dumps(training_manifest()))
    html = Path(write_training_report(tmp_path)).read_text()
    assert Path(tmp_path, TRAIN_REPORT).exists()
    assert html.count("<svg") == 3  # loss, speed, skipped reasons
    assert "skipped: no assistant turn" in html and "train.lr" in html
    assert "Say hello." in html and "Bonjour!" in html  # the end of the prompt, where the question is
    assert "<script" not in html.lower() and "&lt;script&gt;" in html


def test_a_training_page_without_history_or_validation_says_so(tmp_path):
    from pipeline.train.report import build_report as build_training_report

    html = build_training_report(training_manifest(history=None, validation_answers=[], validation_loss=None))
    assert "no per-step history" in html and "no greedy answers" in html


def test_a_choice_job_with_label_probabilities_shows_their_confidence(tmp_path):
    """The settings as the job records them (normalised: {"choice": [...]}) and a label_probs column."""
    probs = [0.9, 0.6, 0.75]
    rows = [output_row(i, response="yes", label_probs=[{"label": "yes", "prob": p}, {"label": "no", "prob": 1 - p}])
            for i, p in enumerate(probs)]
    html = build_report(write_output(tmp_path / "out", [rows], manifest={},
                                     settings={"response_format": {"choice": ["yes", "no"]}}))
    assert "a choice of 2 labels" in html and "Confidence" in html and "label_probs" in html


def test_the_training_page_draws_every_evaluation_and_names_the_step_kept(tmp_path):
    from pipeline.train.report import build_report as build_training_report

    evaluations = [{"step": 1, "loss": 3.0, "accuracy": 0.2}, {"step": 3, "loss": 2.0, "accuracy": 0.5}]
    html = build_training_report(training_manifest(evaluations=evaluations, kept={"policy": "best", "step": 3}))
    assert html.count("<svg") == 4  # loss with evaluations, accuracy, speed, skipped reasons
    assert "Validation token accuracy" in html and "the one of step 3" in html
