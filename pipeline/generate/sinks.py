"""The job's output folder: Parquet parts committed whole, a job file, and `manifest.json` last.

    <output>/.lock                          held by the run writing the folder (see "One writer")
    <output>/job.json                       written first: what the job is (config + input fingerprints)
    <output>/parts/part-00000.parquet ...   committed by rename: a part on disk is always complete
    <output>/parts/part-w<32 hex>.parquet   a part an engine worker committed (output.commit=workers)
    <output>/manifest.json                  written last: its presence means the job finished
    <output>/report.html                    the job's report page, after the manifest (`report`)

A rerun of the same job into the same folder resumes it: the rows of committed parts are not
generated again (each part records its rows' input file and row index), leftovers of a part
that was being written are removed, and the rest is generated. A rerun whose config or inputs
differ from `job.json` is refused with what changed, unless `output.overwrite=true` starts afresh.

Only files this module (or `part_files`) creates are ever deleted, because `output.path` may be
any folder, shared with other tools' files:
  - leftovers: `.job.json.tmp-<32 hex>` and `.manifest.json.tmp-<32 hex>` at the top, and
    `.part-<5+ digits>.parquet.tmp-<32 hex>` and `.part-w<32 hex>.parquet.tmp-<32 hex>` in
    `parts/`, regular files only (symlinks and folders with such names are left alone);
  - with `output.overwrite=true`, and only in a folder that has a `job.json`: `job.json`,
    `manifest.json`, `report.html` (it would describe the previous job), the regular files named as
    parts in `parts/` (`part_files.PART_FILE`), and the leftovers above.
    Everything else (`logs/`, the user's files, `.lock`) stays. A folder without `job.json` that
    holds a `manifest.json` or `parts/part-*.parquet` is not this project's job output, so it is
    refused whatever `overwrite` says. A `parts` that is a symlink or not a folder is refused
    too, so that no deletion or write lands outside the output folder.

One writer: `OutputDir.open()` takes an exclusive lock on `<output>/.lock` before it reads or
deletes anything and holds it until `close()` or `finish()`; a second run is refused, naming the
holder (`pipeline.generate.folder_lock`).

Parts are never written over: each is published under the next free `part-<index>` name, and
indices are parsed as numbers, so part 100000 follows part 99999 (`pipeline.generate.part_files`).
With `output.commit=workers` the engine workers publish parts named by the rows they hold
(`pipeline.generate.worker_commit`, made by `committer()`) and the driver `record`s their
ledger entries instead of adding rows.
Before `manifest.json` is written, `finish()` checks from the parts' row ranges that every
planned input row was committed exactly once; a gap or a duplicate stops the job without a
manifest (`pipeline.generate.coverage`).

On an object store (`output.path=s3://...`), `output_dir` gives `store_output.StoreOutputDir`:
the same folder and guarantees, with a part staged and then copied into `parts/` in place of the
rename, and a lease object in place of `flock` (`folder_lock.ObjectStoreLock`).

The parts have a folder of their own so that any Parquet reader can be pointed at it
(`pyarrow.parquet.read_table("<output>/parts")`) without tripping over the JSON files.

Pure module: stdlib + pyarrow.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.generate.config import describe_changes
from pipeline.generate.coverage import check_exactly_once, part_entry
from pipeline.generate.folder_lock import FolderLock
from pipeline.generate.part_files import (
    PART_FILE,
    PART_LEFTOVER,
    is_numbered,
    part_index,
    part_name,
    part_sort_key,
    tmp_name,
    write_part,
)
from pipeline.manifests import iso_time

JOB = "job.json"
MANIFEST = "manifest.json"
REPORT = "report.html"
PARTS = "parts"
STATS_COLUMNS = ["error", "prompt_tokens", "completion_tokens", "finish_reason", "tool_parse"]

# The names `tmp_name` gives to files before they are renamed into place; nothing else is
# ever cleaned up.
_TOP_LEFTOVER = re.compile(r"^\.(job\.json|manifest\.json)\.tmp-[0-9a-f]{32}$")
_MAX_PROBLEMS = 10


class OutputError(UserError):
    """A problem with the output folder (`output.*`): the user's to fix, before anything is
    written, or a damaged folder found on resume."""


def write_json_atomic(path: str, data: dict) -> None:
    tmp = tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
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
        # A YAML "no" or "false" in quotes is a non-empty string, which would read as true.
        if not isinstance(overwrite, bool):
            raise OutputError(f"output.overwrite: must be true or false (got {overwrite!r})")
        self.path = path
        self.overwrite = overwrite
        self.rows_per_part = rows_per_part
        self.parts: list[dict] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._lock = self._make_lock()
        self._next: int | None = None  # the next part index, once known
        self._recorded: set[str] | None = None  # the parts' names, once a worker's part is recorded

    @property
    def shown(self) -> str:
        """The folder as messages name it (a URI without credentials)."""
        return self.path

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder for other runs (idempotent); the lock file stays."""
        self._lock.release()

    def __del__(self) -> None:
        # A caller that drops the object without close() (an exception between open() and
        # finish()) must not keep the folder locked for the rest of its process.
        try:
            self.close()
        except Exception:
            pass

    # -- the folder's storage: a local disk here; an object store in `store_output.StoreOutputDir` --

    def _make_lock(self):
        return FolderLock(self.path, error=OutputError)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def _read_text(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def _write_json(self, path: str, data: dict) -> None:
        write_json_atomic(path, data)

    def _read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, columns=columns)

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.path)

    def _make_parts_dir(self) -> None:
        os.makedirs(self._parts_dir(), exist_ok=True)

    def _remove_leftovers(self) -> None:
        for path in self._leftovers():
            os.remove(path)  # a part, job file or manifest that was being written when a run stopped

    def _remove_own_leftovers(self) -> None:
        """Before the manifest: what this run's dead workers left half-written. On a disk those
        are hidden files no reader sees, left for the next run's cleanup; see StoreOutputDir."""

    # -- what is on disk -------------------------------------------------------------------------

    def _parts_dir(self) -> str:
        """`<output>/parts`, refused when it is a symlink or not a folder: following it would
        delete or write files somewhere else."""
        parts = self._file(PARTS)
        try:
            mode = os.lstat(parts).st_mode
        except FileNotFoundError:
            return parts
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            what = "a symlink" if stat.S_ISLNK(mode) else "not a folder"
            raise OutputError(
                f"'{parts}' is {what}; the job writes its parts into a real folder there: "
                "remove it or choose another output.path"
            )
        return parts

    def _part_names(self) -> list[str]:
        """Every entry of parts/ named like a part, whatever its type."""
        parts = self._parts_dir()
        try:
            names = os.listdir(parts)
        except FileNotFoundError:
            return []
        return [n for n in names if PART_FILE.match(n)]

    def part_files(self) -> list[str]:
        """The committed parts (regular files named as parts, `part_files.PART_FILE`), in
        `part_sort_key` order."""
        parts = self._parts_dir()
        names = [n for n in self._part_names() if _is_regular(os.path.join(parts, n))]
        return [os.path.join(parts, n) for n in sorted(names, key=part_sort_key)]

    def _looks_like_output(self) -> bool:
        parts = self._parts_dir()
        try:
            names = os.listdir(parts)
        except (FileNotFoundError, NotADirectoryError):
            names = []
        return os.path.lexists(self._file(MANIFEST)) or any(fnmatch.fnmatchcase(n, "part-*.parquet") for n in names)

    def _leftovers(self) -> list[str]:
        """Files this module was writing when a run stopped (see `part_files.tmp_name`): regular
        files only."""
        found = []
        for folder, pattern in ((self.path, _TOP_LEFTOVER), (self._parts_dir(), PART_LEFTOVER)):
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            found += [os.path.join(folder, n) for n in names if pattern.match(n)]
        return sorted(p for p in found if _is_regular(p))

    # -- opening ---------------------------------------------------------------------------------

    def open(self, fingerprint: dict) -> Resume:
        """Claim the folder for the job `fingerprint` describes; return what is already done.

        The folder stays locked for this object until `close()` or `finish()`; a job found
        complete is released at once, since nothing more will be written."""
        self._lock.acquire()
        try:
            resume = self._open(fingerprint)
        except BaseException:
            self.close()
            raise
        if resume.complete:
            self.close()
        return resume

    def _open(self, fingerprint: dict) -> Resume:
        job_file, manifest_file = self._file(JOB), self._file(MANIFEST)
        self._parts_dir()  # refuses a parts/ that is not a real folder before anything is read
        has_job = self._exists(job_file)
        if not has_job and self._looks_like_output():
            raise OutputError(
                f"output.path '{self.shown}' holds a {MANIFEST} or {PARTS}/part-*.parquet files but no {JOB}, "
                "so it is not this project's job output (or not all of it); choose another output.path "
                "or remove those files"
            )
        if self.overwrite and has_job:
            self._remove_previous_output()
            has_job = False
        has_manifest = self._exists(manifest_file)
        self.parts, self._recorded = [], None
        if has_job:
            previous = _read_json_object(job_file, "fingerprint", self._read_text)["fingerprint"]
            if not isinstance(previous, dict):
                raise OutputError(
                    f"'{job_file}' is damaged (its \"fingerprint\" is not an object); "
                    "set output.overwrite=true to start afresh, or choose another output.path"
                )
            changes = describe_changes(previous, fingerprint)
            if changes:
                raise OutputError(
                    f"output.path '{self.shown}' holds a job with other settings or inputs, so it cannot be resumed:\n"
                    + "\n".join(f"  - {c}" for c in changes)
                    + "\nrerun with the same settings to resume it, choose another output.path, "
                    "or set output.overwrite=true to start afresh"
                )
            if has_manifest:
                manifest = _read_json_object(manifest_file, "parts", self._read_text)
                self._check_listed_parts(manifest)
                return Resume(complete=True, manifest=manifest)
        self._make_parts_dir()
        self._remove_leftovers()
        if not has_job:
            self._write_json(job_file, {"fingerprint": fingerprint, "created_at": iso_time(time.time())})
        resume = Resume()
        for path in self.part_files():
            try:
                meta = self._read_part(path, ["source_file", "source_row"])
                entry = part_entry(self._relative(path), meta)
                sources, rows = meta.column("source_file").to_pylist(), meta.column("source_row").to_pylist()
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
                raise OutputError(
                    f"'{path}' cannot be read ({e}); the output is damaged: remove that part to generate "
                    "its rows again, or set output.overwrite=true to regenerate the whole output"
                ) from e
            for source, row in zip(sources, rows):
                resume.done.setdefault(source, set()).add(row)
            resume.rows += meta.num_rows
            self.parts.append(entry)
        return resume

    def _remove_previous_output(self) -> None:
        """output.overwrite=true on this project's output: delete what it wrote, nothing else."""
        for name in (JOB, MANIFEST, REPORT):
            path = self._file(name)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            # unlinking a symlink removes the link, never its target
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise OutputError(f"'{path}' is not a file; remove it or choose another output.path")
            os.remove(path)
        for path in self.part_files() + self._leftovers():
            os.remove(path)

    def _check_listed_parts(self, manifest: dict) -> None:
        listed = manifest["parts"]
        if not isinstance(listed, list) or not all(
            isinstance(p, dict) and isinstance(p.get("file"), str) for p in listed
        ):
            raise OutputError(
                f"'{self._file(MANIFEST)}' is damaged (its \"parts\" is not a list of parts); "
                "set output.overwrite=true to regenerate the output, or choose another output.path"
            )
        missing = [p["file"] for p in listed if not self._is_part(self._file(p["file"]))]
        if missing:
            shown = ", ".join(missing[:_MAX_PROBLEMS]) + (", ..." if len(missing) > _MAX_PROBLEMS else "")
            raise OutputError(
                f"output.path '{self.shown}': {MANIFEST} lists {len(missing)} part(s) that are missing ({shown}); "
                "the output is damaged: set output.overwrite=true to regenerate it"
            )

    def _is_part(self, path: str) -> bool:
        return _is_regular(path)

    # -- writing ---------------------------------------------------------------------------------

    def committed_stats_tables(self):
        """The committed parts' usage columns, one table per part (for the job's totals)."""
        for path in self.part_files():
            yield self._read_part(path, STATS_COLUMNS)

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
        name = self._commit_part(table)
        self.parts.append(part_entry(name, table))
        self._pending, self._pending_rows = [], 0

    def _next_index(self) -> int:
        """One past the highest part index known, in this run's parts or on disk. The folder
        is listed once per run: with the lock held, no one else adds parts."""
        if self._next is None:
            names = [os.path.basename(p["file"]) for p in self.parts if isinstance(p.get("file"), str)]
            indices = [part_index(n) for n in names + self._part_names() if is_numbered(n)]
            self._next = 1 + max(indices, default=-1)
        return self._next

    def _commit_part(self, table: pa.Table) -> str:
        """Write `table` as the next part; return its name relative to the folder."""
        index = write_part(self._parts_dir(), self._next_index(), table)
        self._next = index + 1
        return f"{PARTS}/{part_name(index)}"

    def record(self, entry: dict) -> bool:
        """Record a part an engine worker committed (`output.commit=workers`): its manifest entry
        (`file`, `rows`, `covers`), never its rows. An entry for a part already recorded (a batch
        that Ray did twice, both finding the same part) is ignored; True if it was new."""
        if self._recorded is None:
            self._recorded = {p["file"] for p in self.parts if isinstance(p.get("file"), str)}
        if entry["file"] in self._recorded:
            return False
        self._recorded.add(entry["file"])
        self.parts.append({key: entry[key] for key in ("file", "rows", "covers")})
        return True

    def committer(self):
        """What an engine worker commits its parts with (`output.commit=workers`): picklable, and
        writing into this folder under this run's lock (`pipeline.generate.worker_commit`)."""
        from pipeline.generate.worker_commit import LocalParts

        return LocalParts(self.path, self._parts_dir(), self._lock.token)

    def rewrite_manifest(self, manifest: dict) -> None:
        """Replace the finished job's `manifest.json` whole (`retry=errors` records its attempt)."""
        self._write_json(self._file(MANIFEST), manifest)

    def finish(self, manifest: dict, expected_rows: dict[str, int] | None = None, per_row: int = 1,
               selected: dict[str, list[int]] | None = None) -> dict:
        """Commit what is pending and write `manifest.json`, then release the folder.

        `expected_rows` (input file -> its number of rows in the plan), when given, is checked
        against the parts first: every row committed exactly once (`per_row` times with n answers
        per row; only the `selected` rows with a limit), or no manifest is written."""
        try:
            self.flush()
            parts = sorted(self.parts, key=lambda p: (*part_sort_key(os.path.basename(p["file"])), p["file"]))
            if expected_rows is not None:
                problems = check_exactly_once(parts, expected_rows, per_row, selected)
                if problems:
                    shown = problems[:_MAX_PROBLEMS]
                    if len(problems) > len(shown):
                        shown.append(f"... and {len(problems) - len(shown)} more")
                    raise OutputError(
                        f"output.path '{self.shown}': the committed parts do not hold every planned row exactly "
                        f"once, so {MANIFEST} was not written:\n"
                        + "\n".join(f"  - {p}" for p in shown)
                        + "\nrerun the job to generate missing rows; rows committed more than once need "
                        "output.overwrite=true to regenerate the output"
                    )
            manifest = {**manifest, "parts": parts}
            self._remove_own_leftovers()
            self._write_json(self._file(MANIFEST), manifest)
            return manifest
        finally:
            self.close()


def output_dir(path: str, *, overwrite: bool = False, rows_per_part: int = 1024) -> OutputDir:
    """The output folder at `path`: a local folder, or a folder on an object store or any other
    filesystem (`pipeline.generate.store_output`), with the same guarantees."""
    from pipeline.storage import is_remote

    if is_remote(path):
        from pipeline.generate.store_output import StoreOutputDir

        return StoreOutputDir(path, overwrite=overwrite, rows_per_part=rows_per_part)
    return OutputDir(path, overwrite=overwrite, rows_per_part=rows_per_part)


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_json_object(path: str, required: str, read) -> dict:
    """A JSON object this module wrote, with its `required` key; a damaged one is an OutputError."""
    problem = None
    try:
        data = json.loads(read(path))
    except (OSError, ValueError) as e:
        problem = f"cannot be read ({e})"
    else:
        if not isinstance(data, dict):
            problem = "is not a JSON object"
        elif required not in data:
            problem = f'has no "{required}"'
    if problem:
        raise OutputError(
            f"'{path}' {problem}; the output is damaged: set output.overwrite=true to start afresh, "
            "or choose another output.path"
        )
    return data

