"""From the job's input paths to a `ShardPlan`: the Parquet files, their row groups, stable row ids.

Every problem with the inputs (a path that matches nothing, a file that is not Parquet, a file
with neither a `prompt` nor a `messages` column, a missing id column, a column whose type
differs between files) is found here, before any engine starts or any output is written, and
reported at once with the path and what to do.

Pure module: stdlib and pyarrow only (`row_ids` checks that ids are unique).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.generate.row_ids import derived_row_id as derived_row_id  # where read tasks and tests take it
from pipeline.generate.row_ids import duplicate_ids
from pipeline.schema import REQUEST_FIELDS


class InputError(UserError):
    """The job's inputs cannot be used as given. The message names the path and the fix."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, heading="invalid input:")


@dataclass(frozen=True)
class Shard:
    """A run of row groups of one file: one Ray Data read task."""

    path: str  # the file's path or URI: a read task opens its store wherever it runs
    source: str  # the file's name relative to the inputs' common folder, used in row ids
    row_groups: tuple[int, ...]
    first_row: int  # index in the file of the shard's first row
    num_rows: int
    columns: tuple[str, ...]  # the columns to read
    skip_rows: int = 0  # rows of the first row group before the shard's first (a split row group)

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
    rows_in: dict = field(default_factory=dict)  # source -> the file's number of rows


# The Arrow types each request field may have in a Parquet file. A column of another type is
# refused at planning, naming the file, the column and its type: every one of its rows would be
# refused anyway, or its values would have to be guessed at (a date as text?).
_TEXT = "text (string or binary)"
FIELD_KINDS = {
    "prompt": "text", "lora": "text",
    "raw": "boolean", "stream": "boolean",
    "max_tokens": "integer", "top_k": "integer", "seed": "integer", "min_tokens": "integer", "top_logprobs": "integer",
    "logprobs": "boolean", "stop": "stop",
    "temperature": "number", "top_p": "number", "repetition_penalty": "number",
    "frequency_penalty": "number", "presence_penalty": "number",
    "messages": "nested", "tools": "nested", "functions": "nested", "response_format": "nested",
    "image": "image",
}
KIND_ACCEPTS = {
    "text": _TEXT,
    "boolean": "boolean",
    "integer": "integer, floating point or decimal",
    "number": "integer, floating point or decimal",
    "nested": "JSON text, list, struct or map",
    "image": "binary, text or a list of numbers",
    "stop": "text (one stop string) or a list of text",
}


def _is_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))


def _json_leaf_problem(t: pa.DataType) -> pa.DataType | None:
    """The first type inside a nested column that has no JSON meaning (dates, times, durations,
    unions...), or None when every part of it converts to JSON."""
    if pa.types.is_dictionary(t):
        return _json_leaf_problem(t.value_type)
    if pa.types.is_null(t) or pa.types.is_boolean(t) or _is_number(t) or _is_text(t):
        return None
    if _is_list(t):
        return _json_leaf_problem(t.value_type)
    if pa.types.is_struct(t):
        return next((p for p in (_json_leaf_problem(f.type) for f in t) if p is not None), None)
    if pa.types.is_map(t):
        if not _is_text(t.key_type) or pa.types.is_fixed_size_binary(t.key_type):
            return t.key_type
        return _json_leaf_problem(t.item_type)
    return t


def request_column_problem(field: str, t: pa.DataType) -> str | None:
    """Why a column of Arrow type `t` cannot hold the request field `field`, or None."""
    kind = FIELD_KINDS[field]
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        ok = True
    elif kind == "text":
        ok = _is_text(t)
    elif kind == "boolean":
        ok = pa.types.is_boolean(t)
    elif kind in ("integer", "number"):
        ok = _is_number(t)
    elif kind == "image":
        ok = _is_text(t) or (_is_list(t) and _is_number(t.value_type))
    elif kind == "stop":
        ok = _is_text(t) or (_is_list(t) and (_is_text(t.value_type) or pa.types.is_null(t.value_type)))
    else:
        ok = (_is_text(t) or _is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t)) and _json_leaf_problem(t) is None
        if not ok and (_is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t)):
            return f"type {t} is not accepted for field {field}: it holds {_json_leaf_problem(t)}, which has no JSON form"
    return None if ok else f"type {t} is not accepted for field {field} (accepted: {KIND_ACCEPTS[kind]})"


def resolve_inputs(inputs: str | list[str]) -> list[str]:
    """Files named by `inputs`: files, folders (every *.parquet below them) or glob patterns, as
    local absolute paths or URIs on any store (`pipeline.storage`)."""
    return [f.uri for f in input_files(inputs)]


def input_files(inputs: str | list[str]) -> list[storage.Location]:
    """`resolve_inputs`' files as locations, each with what the listing or lookup that found it
    said of it (`Location.listed`: size and write time)."""
    specs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not specs:
        raise InputError(["input: no input given; set input=<file, folder or glob of Parquet files>"])
    files: list[storage.Location] = []
    problems = []
    for spec in specs:
        try:
            files.extend(storage.expand(str(spec), "input"))
        except storage.StorageError as exc:
            problems.append(str(exc))
    if problems:
        raise InputError(problems)
    duplicates = sorted(uri for uri, n in collections.Counter(f.uri for f in files).items() if n > 1)
    if duplicates:
        raise InputError([f"input: '{storage.shown(f)}' is named more than once; each file is read once"
                          for f in duplicates])
    return files


def open_parquet(uri: str) -> pq.ParquetFile:
    """The Parquet file at a local path or URI, opened through its store."""
    location = storage.resolve(uri, "input")
    return pq.ParquetFile(location.filesystem.open_input_file(location.path))


def read_footer(file: storage.Location) -> tuple[pq.FileMetaData, pa.Schema]:
    """A Parquet file's footer: its row groups and its Arrow schema. With the file's size known
    from the listing that found it (`Location.listed`), a store is asked for the footer alone (one
    ranged read) rather than for the object's size first and then the footer."""
    size = file.listed.size if file.listed is not None else None
    fragment = pads.ParquetFileFormat().make_fragment(file.path, file.filesystem, file_size=size)
    return fragment.metadata, fragment.physical_schema


def read_columns(uri: str, columns: list[str]) -> pa.Table:
    location = storage.resolve(uri, "input")
    return pq.read_table(location.path, columns=columns, filesystem=location.filesystem)


def plan_shards(
    inputs: str | list[str],
    *,
    id_column: str | None = None,
    passthrough: list[str] | tuple[str, ...] = (),
    rows_per_shard: int = 4096,
    template_columns: tuple[str, ...] | None = None,
    request_columns: bool = True,
) -> ShardPlan:
    """The input files' rows in shards of whole row groups, with every problem of the files'
    columns found first. `template_columns`: the columns `prompt.template` names (a template
    writes the requests, so files need no prompt or messages column); None: no template.
    `request_columns` false: columns named like request fields are not read (nor checked)."""
    fields = REQUEST_FIELDS if request_columns else ()
    found = input_files(inputs)
    files = [f.uri for f in found]
    root = storage.common_root(files)
    problems: list[str] = []
    shards: list[Shard] = []
    rows_in: dict[str, int] = {}
    column_types: dict[str, dict[str, list[str]]] = {}
    total = 0
    for file in found:
        uri = file.uri
        path = storage.shown(uri)  # what messages name
        try:
            metadata, schema = read_footer(file)
        except (pa.ArrowInvalid, OSError) as exc:
            problems.append(f"{path}: not a readable Parquet file ({_first_line(exc)})")
            continue
        names = set(schema.names)
        if template_columns is not None:
            absent = [c for c in template_columns if c not in names]
            if absent:
                problems.append(
                    f"{path}: has no column {', '.join(repr(c) for c in absent)}, which prompt.template names "
                    f"(columns: {', '.join(schema.names) or 'none'})"
                )
                continue
        elif "prompt" not in names and "messages" not in names:
            problems.append(
                f"{path}: has neither a 'prompt' nor a 'messages' column (columns: {', '.join(schema.names) or 'none'})"
            )
            continue
        if id_column and id_column not in names:
            problems.append(f"{path}: has no id column '{id_column}' (set id_column=null to derive ids from file and row)")
            continue
        for name in fields:
            if name in names:
                problem = request_column_problem(name, schema.field(name).type)
                if problem:
                    problems.append(f"{path}: column '{name}': {problem}; convert the column or leave it out")
        if id_column:
            id_type = schema.field(id_column).type
            if pa.types.is_nested(id_type) or pa.types.is_dictionary(id_type) and pa.types.is_nested(id_type.value_type):
                problems.append(f"{path}: id column '{id_column}' has type {id_type}; ids must be single values "
                                "(text or numbers)")
        for name in passthrough:
            if name in names:
                column_types.setdefault(name, {}).setdefault(schema.field(name).type, []).append(path)
        wanted = [n for n in schema.names
                  if n in fields or n == id_column or n in passthrough or n in (template_columns or ())]
        source = storage.relative_name(uri, root)
        rows_in[source] = metadata.num_rows
        shards.extend(_split(uri, source, metadata, tuple(wanted), rows_per_shard))
        total += metadata.num_rows
    for name, by_type in column_types.items():
        if len(by_type) > 1:
            kinds = "; ".join(f"{t} in {', '.join(p.rsplit('/', 1)[-1] for p in ps)}" for t, ps in by_type.items())
            problems.append(f"passthrough column '{name}' has different types across files ({kinds}); make them agree")
    missing = [name for name in passthrough if name not in column_types]
    if missing and len(rows_in) == len(files):
        problems.extend(
            f"passthrough: no input file has a column '{name}' (check the spelling; columns are case-sensitive)"
            for name in missing
        )
    if id_column and not problems:
        problems.extend(duplicate_ids(files, root, id_column, total))
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
        fingerprints=file_fingerprints(found, root, rows_in),
        passthrough_types={name: next(iter(by_type)) for name, by_type in column_types.items()},
        rows_in=rows_in,
    )


def limit_rows(plan: ShardPlan, limit: int) -> dict[str, list[int]]:
    """`limit` of the plan's rows for a preview: spread evenly over all rows, files in name order
    (row i * total // limit), so every file of a large input shows up and the same rows are
    picked every time, whatever the order the inputs were given in. Input file -> its row indices."""
    total = plan.total_rows
    picks = [i * total // min(limit, total) for i in range(min(limit, total))]
    selected: dict[str, list[int]] = {}
    start = 0
    sources = iter(sorted(plan.rows_in.items()))
    source, rows = next(sources)
    for pick in picks:
        while pick >= start + rows:
            start += rows
            source, rows = next(sources)
        selected.setdefault(source, []).append(pick - start)
    return selected


def file_fingerprints(files: list[storage.Location], root: str, rows_in: dict[str, int]) -> dict[str, str]:
    """Each input file's content identity, by its name relative to `root` (see file_fingerprint).
    Files are fingerprinted a few at a time: reading local files (or asking a store about its
    objects) is most of the cost, and storage serves several requests at once."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        sources = [storage.relative_name(f.uri, root) for f in files]
        digests = pool.map(lambda pair: file_fingerprint(pair[0], rows_in[pair[1]]), zip(files, sources))
        return dict(zip(sources, digests))


# pyarrow's filesystems (`type_name`) whose files are objects: written whole, never edited in place,
# and stamped with the time of each write (S3, Google Cloud Storage, Azure Blob Storage).
OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})


def file_fingerprint(file: str | storage.Location, num_rows: int) -> str:
    """What identifies a file's content for resuming: its row count, and

    * an object on an object store (`OBJECT_STORES`): its size and the time it was written, from
      the listing that found it (`Location.listed`) or else one metadata request, without reading
      it. Rewriting an object (even with the same bytes) gives it a new time, so a changed input
      is still refused on resume; so is a copy. A store's listing and its metadata request give
      an object the same size and time, so a file found by listing a folder on one run and named
      on its own on the next keeps its fingerprint.
    * any other file (local, or on a store whose files can be edited in place or that reports no
      write time): a hash of every byte. Any edit (two prompts swapped, one changed for another
      of the same length) changes it, while copying or touching the file does not. Streamed, so
      a file of any size is read once in pieces.
    """
    location = storage.resolve(file, "input") if isinstance(file, str) else file
    if location.filesystem.type_name in OBJECT_STORES:
        info = location.listed
        if info is None or info.mtime is None or info.size is None:
            info = location.info()
        if info.mtime is not None and info.size is not None:
            return f"{num_rows}:store:{info.size}:{info.mtime_ns}"
    digest = hashlib.sha256()
    with location.filesystem.open_input_stream(location.path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{num_rows}:sha256:{digest.hexdigest()}"


def _split(path, source, metadata, columns, rows_per_shard) -> list[Shard]:
    """Runs of whole row groups of at most `rows_per_shard` rows; a row group larger than that is
    cut into pieces of `rows_per_shard` rows, so no read task turns more rows than that into
    Python objects."""
    shards, groups, start, rows, first = [], [], 0, 0, 0
    for i in range(metadata.num_row_groups):
        n = metadata.row_group(i).num_rows
        if groups and rows + n > rows_per_shard:
            shards.append(Shard(path, source, tuple(groups), first, rows, columns))
            groups, first, rows = [], start, 0
        if n > rows_per_shard:
            for skip in range(0, n, rows_per_shard):
                shards.append(Shard(path, source, (i,), start + skip, min(rows_per_shard, n - skip), columns, skip))
            start += n
            first = start
            continue
        groups.append(i)
        rows += n
        start += n
    if groups and rows:
        shards.append(Shard(path, source, tuple(groups), first, rows, columns))
    return shards


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
