"""The job's output folder: Parquet parts committed whole, a job file, and `manifest.json` last.

    <output>/job.json                       written first: what the job is (config + input fingerprints)
    <output>/parts/part-00000.parquet ...   committed by rename: a part on disk is always complete
    <output>/manifest.json                  written last: its presence means the job finished

A rerun of the same job into the same folder resumes it: the rows of committed parts are not
generated again (each part records its rows' input file and row index), leftovers of a part
that was being written are removed, and the rest is generated. Every input row thus lands in
exactly one committed part. A rerun whose config or inputs differ from `job.json` is refused
with what changed, unless `output.overwrite=true` starts afresh.

The parts have a folder of their own so that any Parquet reader can be pointed at it
(`pyarrow.parquet.read_table("<output>/parts")`) without tripping over the JSON files.

Pure module: stdlib + pyarrow.
"""

from __future__ import annotations

import glob
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

JOB = "job.json"
MANIFEST = "manifest.json"
PARTS = "parts"
STATS_COLUMNS = ["error", "prompt_tokens", "completion_tokens", "finish_reason", "tool_parse"]


class OutputError(ValueError):
    pass


def _tmp_name(path: str) -> str:
    """Where `path` is written before it is renamed into place: hidden (a leading dot), so that a
    reader of the folder (pyarrow skips '.' and '_' files) never sees a half-written file, even
    one a killed job left behind."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")


def write_json_atomic(path: str, data: dict) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(path: str, table: pa.Table) -> None:
    tmp = _tmp_name(path)
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Resume:
    """What earlier runs of this job committed."""

    complete: bool = False
    manifest: dict | None = None
    done: dict[str, set[int]] = field(default_factory=dict)  # source file -> committed row indices
    rows: int = 0

    def skip_for(self, source: str) -> frozenset[int]:
        return frozenset(self.done.get(source, ()))


class OutputDir:
    def __init__(self, path: str, *, overwrite: bool = False, rows_per_part: int = 1024):
        self.path = path
        self.overwrite = overwrite
        self.rows_per_part = rows_per_part
        self.parts: list[dict] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def part_files(self) -> list[str]:
        return sorted(glob.glob(self._file(f"{PARTS}/part-*.parquet")))

    def _leftovers(self) -> list[str]:
        patterns = (f"{PARTS}/.*.tmp-*", ".*.tmp-*", f"{PARTS}/*.tmp-*", "*.tmp-*")  # the last two: older runs
        return sorted({p for pattern in patterns for p in glob.glob(self._file(pattern))})

    def open(self, fingerprint: dict) -> Resume:
        """Claim the folder for the job `fingerprint` describes; return what is already done."""
        job_file, manifest_file = self._file(JOB), self._file(MANIFEST)
        has_job, has_manifest, parts = os.path.exists(job_file), os.path.exists(manifest_file), self.part_files()
        if self.overwrite:
            for path in parts + self._leftovers() + [p for p in (job_file, manifest_file) if os.path.exists(p)]:
                os.remove(path)
            has_job = has_manifest = False
            parts = []
        if not has_job and (parts or has_manifest):
            raise OutputError(
                f"output.path '{self.path}' holds output that is not this job's (no {JOB}); "
                "choose another output.path or set output.overwrite=true to replace it"
            )
        if has_job:
            with open(job_file) as f:
                previous = json.load(f)["fingerprint"]
            changes = describe_changes(previous, fingerprint)
            if changes:
                raise OutputError(
                    f"output.path '{self.path}' holds a job with other settings or inputs, so it cannot be resumed:\n"
                    + "\n".join(f"  - {c}" for c in changes)
                    + "\nrerun with the same settings to resume it, choose another output.path, "
                    "or set output.overwrite=true to start afresh"
                )
            if has_manifest:
                with open(manifest_file) as f:
                    return Resume(complete=True, manifest=json.load(f))
        os.makedirs(self._file(PARTS), exist_ok=True)
        for path in self._leftovers():
            os.remove(path)  # a part or manifest that was being written when the job stopped
        if not has_job:
            write_json_atomic(job_file, {"fingerprint": fingerprint, "created_at": _iso(time.time())})
        resume = Resume()
        for path in parts:
            meta = pq.read_table(path, columns=["source_file", "source_row"])
            for source, row in zip(meta.column("source_file").to_pylist(), meta.column("source_row").to_pylist()):
                resume.done.setdefault(source, set()).add(row)
            resume.rows += meta.num_rows
            self.parts.append(_part_entry(os.path.relpath(path, self.path), meta))
        return resume

    def committed_stats_tables(self):
        """The committed parts' usage columns, one table per part (for the job's totals)."""
        for path in self.part_files():
            yield pq.read_table(path, columns=STATS_COLUMNS)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending, promote_options="permissive")
        index = 1 + max((int(os.path.basename(p["file"])[5:10]) for p in self.parts), default=-1)
        name = f"{PARTS}/part-{index:05d}.parquet"
        write_parquet_atomic(self._file(name), table)
        self.parts.append(_part_entry(name, table))
        self._pending, self._pending_rows = [], 0

    def finish(self, manifest: dict) -> dict:
        self.flush()
        manifest = {**manifest, "parts": sorted(self.parts, key=lambda p: p["file"])}
        write_json_atomic(self._file(MANIFEST), manifest)
        return manifest


def describe_changes(previous: dict, current: dict, prefix: str = "") -> list[str]:
    """What differs between two job fingerprints, one line per setting or input file."""
    changes = []
    for key in sorted(set(previous) | set(current)):
        name = f"{prefix}{key}"
        old, new = previous.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            changes.extend(describe_changes(old, new, f"{name}."))
        elif old != new:
            if prefix == "inputs.":
                what = "is new" if old == "<absent>" else "is gone" if new == "<absent>" else "changed"
                changes.append(f"input file {key} {what}")
            else:
                changes.append(f"{name}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}")
    return changes


def _part_entry(name: str, table: pa.Table) -> dict:
    """A part's manifest entry: its row count and, per input file, the row ranges it covers."""
    by_source: dict[str, list[int]] = {}
    for source, row in zip(table.column("source_file").to_pylist(), table.column("source_row").to_pylist()):
        by_source.setdefault(source, []).append(row)
    return {"file": name, "rows": table.num_rows, "covers": {s: _ranges(rows) for s, rows in sorted(by_source.items())}}


def _ranges(rows: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 3], [7, 7]] (inclusive)."""
    out: list[list[int]] = []
    for r in sorted(rows):
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
