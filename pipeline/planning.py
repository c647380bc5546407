"""From the job's input paths to a `ShardPlan`: the Parquet files, their row groups, stable row ids.

Every problem with the inputs (a path that matches nothing, a file that is not Parquet, a file
with neither a `prompt` nor a `messages` column, a missing id column, a column whose type
differs between files) is found here, before any engine starts or any output is written, and
reported at once with the path and what to do.

Pure module: stdlib + pyarrow only.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import REQUEST_FIELDS


class InputError(ValueError):
    """The job's inputs cannot be used as given. The message names the path and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"- {p}" for p in problems))


@dataclass(frozen=True)
class Shard:
    """A run of row groups of one file: one Ray Data read task."""

    path: str
    source: str  # the file's name relative to the inputs' common folder, used in row ids
    row_groups: tuple[int, ...]
    first_row: int  # index in the file of the shard's first row
    num_rows: int
    columns: tuple[str, ...]  # the columns to read

    @property
    def row_range(self) -> range:
        return range(self.first_row, self.first_row + self.num_rows)


@dataclass(frozen=True)
class ShardPlan:
    files: tuple[str, ...]
    shards: tuple[Shard, ...]
    total_rows: int
    id_column: str | None
    passthrough: tuple[str, ...]
    fingerprints: dict = field(default_factory=dict)  # source -> content fingerprint, see file_fingerprint
    passthrough_types: dict = field(default_factory=dict)  # column -> pyarrow type


def resolve_inputs(inputs: str | list[str]) -> list[str]:
    """Files named by `inputs`: files, folders (every *.parquet below them) or glob patterns."""
    specs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not specs:
        raise InputError(["input: no input given; set input=<file, folder or glob of Parquet files>"])
    files: list[str] = []
    problems = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if glob.has_magic(spec):
            matched = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matched:
                problems.append(f"input: the pattern '{spec}' matches no file")
            files.extend(matched)
        elif os.path.isdir(spec):
            matched = sorted(glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True))
            if not matched:
                problems.append(f"input: the folder '{spec}' holds no *.parquet file")
            files.extend(matched)
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            problems.append(f"input: '{spec}' does not exist (give a Parquet file, a folder or a glob)")
    if problems:
        raise InputError(problems)
    files = [os.path.abspath(f) for f in files]
    duplicates = sorted({f for f in files if files.count(f) > 1})
    if duplicates:
        raise InputError([f"input: '{f}' is named more than once; each file is read once" for f in duplicates])
    return files


def plan_shards(
    inputs: str | list[str],
    *,
    id_column: str | None = None,
    passthrough: list[str] | tuple[str, ...] = (),
    rows_per_shard: int = 4096,
) -> ShardPlan:
    files = resolve_inputs(inputs)
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    problems: list[str] = []
    shards: list[Shard] = []
    fingerprints: dict[str, str] = {}
    column_types: dict[str, dict[str, list[str]]] = {}
    total = 0
    for path in files:
        try:
            meta = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            problems.append(f"{path}: not a readable Parquet file ({_first_line(exc)})")
            continue
        schema = meta.schema_arrow
        names = set(schema.names)
        if "prompt" not in names and "messages" not in names:
            problems.append(
                f"{path}: has neither a 'prompt' nor a 'messages' column (columns: {', '.join(schema.names) or 'none'})"
            )
            continue
        if id_column and id_column not in names:
            problems.append(f"{path}: has no id column '{id_column}' (set id_column=null to derive ids from file and row)")
            continue
        for name in passthrough:
            if name in names:
                column_types.setdefault(name, {}).setdefault(schema.field(name).type, []).append(path)
        wanted = [n for n in schema.names if n in REQUEST_FIELDS or n == id_column or n in passthrough]
        source = os.path.relpath(path, root)
        fingerprints[source] = file_fingerprint(path, meta.metadata.num_rows)
        shards.extend(_split(path, source, meta.metadata, tuple(wanted), rows_per_shard))
        total += meta.metadata.num_rows
    for name, by_type in column_types.items():
        if len(by_type) > 1:
            kinds = "; ".join(f"{t} in {', '.join(os.path.basename(p) for p in ps)}" for t, ps in by_type.items())
            problems.append(f"passthrough column '{name}' has different types across files ({kinds}); make them agree")
    if id_column and not problems:
        problems.extend(_duplicate_ids(files, id_column))
    if problems:
        raise InputError(problems)
    if total == 0:
        raise InputError([f"input: the {len(files)} file(s) given hold no rows"])
    return ShardPlan(
        files=tuple(files),
        shards=tuple(shards),
        total_rows=total,
        id_column=id_column,
        passthrough=tuple(passthrough),
        fingerprints=fingerprints,
        passthrough_types={name: next(iter(by_type)) for name, by_type in column_types.items()},
    )


def file_fingerprint(path: str, num_rows: int) -> str:
    """What identifies a file's content for resuming: its size, row count and a hash of its tail.

    A Parquet file's tail is its footer: the schema and every row group's offsets and statistics,
    so an edit almost anywhere changes it, while copying or touching the file does not.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536))
        tail = hashlib.sha256(f.read()).hexdigest()[:16]
    return f"{size}:{num_rows}:{tail}"


def _duplicate_ids(files: list[str], id_column: str) -> list[str]:
    """Ids must be unique: they key the output rows and the resume of an interrupted job."""
    seen: dict[str, str] = {}
    duplicates: list[str] = []
    for path in files:
        for value in pq.read_table(path, columns=[id_column]).column(id_column).to_pylist():
            if value is None:
                continue
            key = str(value)
            if key in seen:
                duplicates.append(f"'{key}' ({os.path.basename(seen[key])} and {os.path.basename(path)})")
            else:
                seen[key] = path
    if not duplicates:
        return []
    shown = ", ".join(duplicates[:5]) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
    return [
        f"id_column '{id_column}': {len(duplicates)} duplicate id(s): {shown}; "
        "make the ids unique, or set id_column=null to use file#row ids"
    ]


def derived_row_id(source: str, row: int) -> str:
    """The id of a row when the input has no id column: its file and its index in the file."""
    return f"{source}#{row}"


def _split(path, source, metadata, columns, rows_per_shard) -> list[Shard]:
    shards, groups, start, rows, first = [], [], 0, 0, 0
    for i in range(metadata.num_row_groups):
        n = metadata.row_group(i).num_rows
        if groups and rows + n > rows_per_shard:
            shards.append(Shard(path, source, tuple(groups), first, rows, columns))
            groups, first, rows = [], start, 0
        groups.append(i)
        rows += n
        start += n
    if groups and rows:
        shards.append(Shard(path, source, tuple(groups), first, rows, columns))
    return shards


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
