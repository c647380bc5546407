"""The generation job's report: `<output>/report.html`, one page that answers "what did I get,
what failed and why, how fast" without opening Python.

The job writes it after `manifest.json`; `python -m jobs.report OUTPUT` rebuilds it for any
output folder, finished or interrupted, on a local disk or any store (`pipeline.storage`), from what is there: the committed parts, `job.json`
and `manifest.json` when there is one. The usage columns of every row are read, but row text
only for the few sample rows the page shows, so a report of millions of rows stays cheap.

Pure module: stdlib, pyarrow and the shared page (`pipeline.report_html`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.generate.prepare import OUTPUT_SCHEMA
from pipeline.generate.sinks import JOB, MANIFEST, REPORT, STATS_COLUMNS, output_dir
from pipeline.report_html import Section, Table, bar_chart, histogram, key_value_table, line_chart, render_page

# Columns every part has that are not the request's own passthrough columns.
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
_SAMPLE_OK = 3
_SAMPLE_ERRORS = 3


@dataclass
class OutputSummary:
    """What the report shows, gathered from an output folder."""

    path: str
    manifest: dict | None
    job: dict | None
    rows: pa.Table  # the usage columns of every committed row, plus its part and row within it
    parts: list[str]
    part_times: list[tuple[float, int, int]] = field(default_factory=list)  # (mtime, rows, completion tokens)

    @property
    def settings(self) -> dict:
        if self.manifest and isinstance(self.manifest.get("settings"), dict):
            return self.manifest["settings"]
        return (self.job or {}).get("fingerprint", {}).get("config", {}) if isinstance(self.job, dict) else {}

    @property
    def planned_rows(self) -> int | None:
        counts = (self.manifest or {}).get("counts") or {}
        if isinstance(counts.get("rows_in"), int):
            return counts["rows_in"]
        inputs = ((self.job or {}).get("fingerprint") or {}).get("inputs") or {}
        try:
            return sum(int(str(v).split(":", 1)[0]) for v in inputs.values())
        except ValueError:
            return None


def write_report(output: str) -> str:
    """Build the report of the output folder `output` and write it as `<output>/report.html`
    (replaced whole, never half written); return its path."""
    html = build_report(output)
    target = storage.resolve(output, "output.path").join(REPORT)
    target.write_text(html)  # a hidden file renamed into place, or one PUT: never seen half written
    return target.shown


def build_report(output: str) -> str:
    return render(read_output(output))


def read_output(output: str) -> OutputSummary:
    """Everything the report needs from `output`; a folder that holds no job output is a
    UserError naming it."""
    if not storage.resolve(output, "output.path").is_dir():
        raise UserError(f"'{storage.shown(output)}' is not a folder; give the output.path of a generation job")
    manifest, job = _read_json(output, MANIFEST), _read_json(output, JOB)
    parts = output_dir(output).part_files()
    if job is None and manifest is None and not parts:
        raise UserError(
            f"'{output}' holds no generation job output (no {JOB}, {MANIFEST} or parts/part-*.parquet); "
            "give the output.path of a generation job"
        )
    tables, part_times = [], []
    for index, path in enumerate(parts):
        try:
            table = _read_part(path, ["id", *STATS_COLUMNS])
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"'{path}' cannot be read as a part ({exc}); remove it or rerun the job to resume") from exc
        n = table.num_rows
        tokens = int(pc.sum(table.column("completion_tokens")).as_py() or 0)
        part_times.append((_mtime(path) or 0.0, n, tokens))
        tables.append(table.append_column("part", pa.array([index] * n, pa.int32()))
                      .append_column("row", pa.array(range(n), pa.int32())))
    schema = pa.schema([("id", pa.string()), ("error", pa.string()), ("prompt_tokens", pa.int64()),
                        ("completion_tokens", pa.int64()), ("finish_reason", pa.string()),
                        ("tool_parse", pa.string()), ("part", pa.int32()), ("row", pa.int32())])
    rows = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()
    return OutputSummary(output, manifest, job, rows, parts, part_times)


def _read_part(path: str, columns: list[str] | None = None) -> pa.Table:
    location = storage.resolve(path)
    return pq.read_table(location.path, columns=columns, filesystem=location.filesystem)


def _mtime(path: str) -> float | None:
    """When the file was last written (a part's commit), in seconds since the epoch."""
    try:
        mtime = storage.resolve(path).info().mtime
    except OSError:
        return None
    return mtime.timestamp() if mtime is not None else None


def _read_json(folder: str, name: str) -> dict | None:
    location = storage.resolve(folder).join(name)
    path = location.shown
    if not location.exists():
        return None
    try:
        data = json.loads(location.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"'{path}' cannot be read ({exc}); the output is damaged") from exc
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a JSON object; the output is damaged")
    return data


# -- what the page shows -----------------------------------------------------------------------


def error_kinds(errors: list[str | None], ids: list[str]) -> list[tuple[str, int, str, str]]:
    """(stage, rows, example id, example message) per error stage, most rows first. A row's
    error names its stage before the first ':' (`invalid request: ...`, `engine error: ...`)."""
    groups: dict[str, list] = {}
    for error, row_id in zip(errors, ids):
        if error is None:
            continue
        stage = error.split(":", 1)[0].strip() if ":" in error else "(unnamed)"
        group = groups.setdefault(stage, [0, row_id, error])
        group[0] += 1
    return sorted(((k, n, i, e) for k, (n, i, e) in groups.items()), key=lambda g: (-g[1], g[0]))


def sample_rows(rows: pa.Table) -> list[tuple[str, int, int]]:
    """(why it is shown, part, row) for a few rows: the first ok ones, the first errors, and the
    ok rows with the longest and the shortest completions."""
    errors = rows.column("error").to_pylist()
    tokens = rows.column("completion_tokens").to_pylist()
    ok = [i for i, e in enumerate(errors) if e is None]
    failed = [i for i, e in enumerate(errors) if e is not None]
    picks: dict[int, list[str]] = {}
    for i in ok[:_SAMPLE_OK]:
        picks.setdefault(i, []).append("ok")
    for i in failed[:_SAMPLE_ERRORS]:
        picks.setdefault(i, []).append("error")
    if ok:
        picks.setdefault(max(ok, key=lambda i: (tokens[i] or 0, -i)), []).append("longest")
        picks.setdefault(min(ok, key=lambda i: (tokens[i] or 0, i)), []).append("shortest")
    part, row = rows.column("part").to_pylist(), rows.column("row").to_pylist()
    return [(", ".join(why), part[i], row[i]) for i, why in sorted(picks.items())]


def throughput_points(summary: OutputSummary) -> tuple[list[float], list[int], list[int], str]:
    """(seconds, rows so far, completion tokens so far, what the clock is): this run's commits
    as the manifest's timeline records them, else the parts' modification times."""
    timeline = ((summary.manifest or {}).get("timeline") or {}).get("points")
    if isinstance(timeline, list) and timeline:
        seconds, rows, tokens = zip(*([(0.0, 0, 0)] + [(float(t), int(r), int(c)) for t, r, c in timeline]))
        return list(seconds), list(rows), list(tokens), "seconds since this run started generating"
    if not summary.part_times:
        return [], [], [], ""
    times = sorted(summary.part_times)
    start = _job_started(summary.path, times[0][0])
    seconds, rows, tokens, r, c = [0.0], [0], [0], 0, 0
    for mtime, n, tok in times:
        r, c = r + n, c + tok
        seconds.append(round(mtime - start, 3))
        rows.append(r)
        tokens.append(c)
    return seconds, rows, tokens, "seconds since job.json was written (part commit times)"


def _job_started(folder: str, first_part: float) -> float:
    written = _mtime(storage.resolve(folder).join(JOB).uri)
    return first_part if written is None else min(written, first_part)


def render(summary: OutputSummary) -> str:
    rows, manifest = summary.rows, summary.manifest or {}
    n = rows.num_rows
    errors = rows.column("error").to_pylist()
    n_errors = sum(e is not None for e in errors)
    ok_mask = [e is None for e in errors]
    prompt_tokens = [t for t, ok in zip(rows.column("prompt_tokens").to_pylist(), ok_mask) if ok]
    completion = [t for t, ok in zip(rows.column("completion_tokens").to_pylist(), ok_mask) if ok]
    planned = summary.planned_rows
    complete = manifest.get("status") == "complete"
    status = "complete" if complete else f"incomplete: {n:,} of {planned if planned is not None else '?'} rows committed"
    throughput = manifest.get("throughput") or {}
    settings = summary.settings
    facts = [
        ("rows", f"{n:,}" + (f" of {planned:,}" if planned is not None and planned != n else "")),
        ("ok", n - n_errors),
        ("errors", n_errors),
        ("prompt tokens", sum(prompt_tokens)),
        ("completion tokens", sum(completion)),
        ("wall time (s)", manifest.get("wall_time_s")),
        ("rows/s", throughput.get("rows_per_s")),
        ("output tokens/s", throughput.get("output_tokens_per_s")),
        ("first row after (s)", throughput.get("time_to_first_row_s")),
        ("prefix cache hit rate", (manifest.get("prefix_cache") or {}).get("hit_rate")),
    ]
    sections = [
        _job_section(summary),
        Section("Tokens", plots=[p for p in (
            histogram(prompt_tokens, "Prompt tokens (ok rows)", "tokens"),
            histogram(completion, "Completion tokens (ok rows)", "tokens"),
        ) if p]),
        Section("How rows ended", plots=[p for p in (
            bar_chart(_counts(rows, "finish_reason"), "Finish reasons"),
            bar_chart(_counts(rows, "tool_parse"), "Tool calls parsed (rows that offered tools)"),
        ) if p]),
        _errors_section(errors, rows.column("id").to_pylist()),
        _labels_section(summary, settings),
        _throughput_section(summary),
        _samples_section(summary),
    ]
    title = f"Generation report: {os.path.basename(os.path.normpath(summary.path)) or summary.path}"
    return render_page(title, status, facts, sections, settings)


def _counts(rows: pa.Table, column: str) -> dict[str, int]:
    return dict(Counter(v for v in rows.column(column).to_pylist() if v is not None))


def _job_section(summary: OutputSummary) -> Section:
    manifest, settings = summary.manifest or {}, summary.settings
    fingerprint = (summary.job or {}).get("fingerprint") or {}
    model = manifest.get("model") or fingerprint.get("model") or {}
    inputs = (manifest.get("inputs") or {}).get("fingerprints") or fingerprint.get("inputs") or {}
    facts = [
        ("output", summary.path),
        ("model", _setting(settings, "model.name")),
        ("model path", _setting(settings, "model.path")),
        ("model revision", model.get("commit")),
        ("started", manifest.get("started_at") or (summary.job or {}).get("created_at")),
        ("finished", manifest.get("finished_at")),
        ("parts", len(summary.parts)),
        ("resources", manifest.get("resources")),
        ("adapters", ", ".join(sorted(manifest.get("adapters") or fingerprint.get("adapters") or {})) or None),
        ("versions", manifest.get("versions") or fingerprint.get("versions")),
    ]
    facts += [(f"input {name}", value) for name, value in sorted(inputs.items())]
    note = None if summary.manifest else (
        f"No {MANIFEST} yet: the job was interrupted or is still running; this page shows the committed parts. "
        "Rerun the same job command to resume it."
    )
    return Section("Job", note=note, tables=[key_value_table(facts)])


def _setting(settings: dict, dotted: str):
    """A setting by its dotted name: the manifest nests them, job.json's fingerprint keys some
    by the dotted name itself."""
    if dotted in settings:
        return settings[dotted]
    value = settings
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _errors_section(errors: list[str | None], ids: list[str]) -> Section:
    kinds = error_kinds(errors, ids)
    if not kinds:
        return Section("Errors", note="No row failed.")
    return Section(
        "Errors",
        note="Grouped by the stage that failed (the text before the first ':' of the error column), with the first "
             "row of each.",
        plots=[bar_chart({k: n for k, n, _, _ in kinds}, "Errors by stage")],
        tables=[Table(["stage", "rows", "example id", "example error"], [list(k) for k in kinds],
                      text_columns=["example error"])],
    )


def _labels_section(summary: OutputSummary, settings: dict) -> Section:
    response_format = _setting(settings, "response_format")
    if not isinstance(response_format, dict):
        return Section("Labels")
    # The settings record the normalised format ({"choice": [...]}); a job.json may hold the raw one.
    choices = response_format.get("choice") or (
        response_format.get("choices") if response_format.get("type") == "choice" else None)
    if not choices:
        return Section("Labels")  # not a labelling job: the section is left out
    labels, confidence = Counter(), []
    for path in summary.parts:
        location = storage.resolve(path)
        names = pq.read_schema(location.path, filesystem=location.filesystem).names
        table = _read_part(path, ["response", "error"] + (["label_probs"] if "label_probs" in names else []))
        wanted = table.column_names
        probs = table.column("label_probs").to_pylist() if "label_probs" in wanted else [None] * table.num_rows
        for response, error, label_probs in zip(table.column("response").to_pylist(),
                                                table.column("error").to_pylist(), probs):
            if error is None and response is not None:
                labels[response] += 1
                chosen = next((p["prob"] for p in label_probs or () if p["label"] == response), None)
                if chosen is not None:
                    confidence.append(100 * chosen)
    for choice in choices:
        labels.setdefault(str(choice), 0)
    plots = [bar_chart(dict(labels), "Labels")]
    if confidence:
        plots.append(histogram(confidence, "Confidence", "probability of the label given (%)"))
    return Section(
        "Labels",
        note=f"The job's response_format is a choice of {len(choices)} labels; ok rows per label"
             + (", and how probable the model found the label it gave (label_probs)." if confidence else
                ". The output holds no label probabilities (label_probs=false), so no confidence is shown."),
        plots=plots,
    )


def _throughput_section(summary: OutputSummary) -> Section:
    seconds, rows, tokens, clock = throughput_points(summary)
    if not seconds:
        return Section("Throughput over time", note="No part committed yet.")
    resumed = ((summary.manifest or {}).get("counts") or {}).get("rows_resumed")
    note = f"Rows and completion tokens committed over time ({clock})."
    if resumed:
        note += f" {resumed:,} rows were committed by an earlier, interrupted run and are not on this run's clock."
    return Section("Throughput over time", note=note, plots=[line_chart(
        [("rows committed", seconds, rows)], "Committed rows over time", clock.split(" (")[0], "rows",
        right=("completion tokens", seconds, tokens, "completion tokens"), markers=len(seconds) < 30, steps=True,
    )])


def _samples_section(summary: OutputSummary) -> Section:
    picks = sample_rows(summary.rows)
    if not picks:
        return Section("Sample rows", note="No row committed yet.")
    wanted: dict[int, set[int]] = {}
    for _, part, row in picks:
        wanted.setdefault(part, set()).add(row)
    full: dict[tuple[int, int], dict] = {}
    passthrough: list[str] = []
    for part, indices in wanted.items():
        table = _read_part(summary.parts[part])
        passthrough += [c for c in table.column_names if c not in OUTPUT_COLUMNS and c not in passthrough]
        for i in indices:
            full[(part, i)] = table.slice(i, 1).to_pylist()[0]
    columns = ["shown as", "id", "finish", "prompt tok", "completion tok", "response or error", "tool calls",
               *passthrough]
    table_rows = []
    for why, part, row in picks:
        r = full[(part, row)]
        calls = json.dumps(r.get("tool_calls"), ensure_ascii=False) if r.get("tool_calls") else None
        table_rows.append([why, r.get("id"), r.get("finish_reason"), r.get("prompt_tokens"), r.get("completion_tokens"),
                           r.get("error") or r.get("response"), calls, *(_text(r.get(c)) for c in passthrough)])
    return Section("Sample rows", note="The first ok rows and errors, and the ok rows with the longest and shortest "
                                       "completions; text is cut at 600 characters.",
                   tables=[Table(columns, table_rows, text_columns=["response or error", "tool calls", *passthrough])])


def _text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
