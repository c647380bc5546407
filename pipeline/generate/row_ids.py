"""Row ids: the derived `file#row` id, and the check that every row's id is unique across the inputs.

The check holds at most about `PARTITION_ROWS` ids on the driver whatever the input's size: when
the inputs hold more rows than that, every id is streamed once (a file's id column batch by batch)
into one of K spill files by a 64-bit hash of its text, K chosen from the row counts of the files'
footers, and each spill file is then counted on its own. Equal ids share a hash, so a duplicate
always meets its twin in the same spill file; the reports of the K files merge into one. With no
more rows than one partition holds, nothing is spilled.

Within a partition only the rows whose hash another row shares can be duplicates: the hashes are
counted first (a sort of 64-bit numbers), and only those rows, usually none, are counted by
their text, which tells a real duplicate from two ids that merely share a hash.

Pure module: stdlib, numpy, pyarrow and pandas (its vectorised hash) only.
"""

from __future__ import annotations

import heapq
import math
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

PARTITION_ROWS = 500_000  # about the most ids the check counts at once: ~0.2 GiB of driver memory (docs/benchmark.md)
READ_ROWS = 65_536  # the ids read from a file at a time: a large row group is read in pieces
SHOWN = 5  # duplicates named in the message, in the order the first row of each appears in the inputs

# seq: the row's index over all files; hash: the id's 64-bit hash (`_hashes`)
_SCHEMA = pa.schema([("id", pa.large_string()), ("seq", pa.int64()), ("hash", pa.uint64())])


def derived_row_id(source: str, row: int) -> str:
    """The id of a row when the input has no id column: its file and its index in the file."""
    return f"{source}#{row}"


def duplicate_ids(files: list[str], root: str, id_column: str, total_rows: int,
                  partition_rows: int | None = None) -> list[str]:
    """Ids must be unique: they key the output rows and the resume of an interrupted job.

    A row whose id is null takes its derived id (`file#row`), which must not equal a real id
    either. `total_rows`: the files' rows, from their footers; it sets how many partitions the
    ids are spread over so that each holds about `partition_rows` (default PARTITION_ROWS) of them.
    """
    partition_rows = partition_rows or PARTITION_ROWS
    # Partitions filled to 80% of the bound on average: the hash's spread seldom takes one past it,
    # where it would be counted in two chunks (twice the counting).
    partitions = 1 if total_rows <= partition_rows else math.ceil(total_rows / (0.8 * partition_rows))
    starts = []  # the index over all files of each file's first row: one number per file
    with _Partitions(partitions, partition_rows) as spill:
        seq = 0
        for path in files:
            starts.append(seq)
            source = storage.relative_name(path, root)
            for first, column in _id_batches(path, id_column):
                ids = _as_text(column)
                if ids.null_count:  # only the null rows' derived ids are made
                    nulls = ids.is_null()
                    rows = np.flatnonzero(nulls.to_numpy(zero_copy_only=False))
                    derived = pa.array([derived_row_id(source, first + int(r)) for r in rows], pa.large_string())
                    ids = pc.replace_with_mask(ids, nulls, derived)
                spill.add(ids, np.arange(starts[-1] + first, starts[-1] + first + len(ids), dtype=np.int64))
                seq = starts[-1] + first + len(ids)
        count, shown = 0, []
        for chunks in spill.partitions():
            dup = _duplicates(_candidates(chunks))
            count += dup.num_rows
            first_seen = dup.sort_by("first").slice(0, SHOWN).to_pylist()
            shown = heapq.nsmallest(SHOWN, shown + first_seen, key=lambda row: row["first"])
    if count == 0:
        return []
    names = []
    for row in shown:
        first, last = (files[int(np.searchsorted(starts, row[k], side="right")) - 1].rsplit("/", 1)[-1]
                       for k in ("first", "last"))
        names.append(f"'{row['id']}' ({first} and {last})")
    more = f" and {count - SHOWN} more" if count > SHOWN else ""
    return [
        f"id_column '{id_column}': {count} duplicate id(s): {', '.join(names)}{more}; "
        "make the ids unique, or set id_column=null to use file#row ids "
        "(a row with a null id is given its file#row id, which must not be another row's id either)"
    ]


def _id_batches(path: str, id_column: str):
    """(index in the file of the batch's first row, the batch's ids) over the file, READ_ROWS at a time."""
    location = storage.resolve(path, "input")
    with location.filesystem.open_input_file(location.path) as f:
        first = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS, columns=[id_column]):
            yield first, batch.column(0)
            first += batch.num_rows


def _candidates(chunks):
    """The rows of one partition (`chunks()`: an iterator over its chunks, each call a new one)
    whose hash more than one row of the partition has: every duplicate id is among them. The
    partition is read a second time only when there are such rows."""
    repeated = _repeated(chunk.column("hash").to_numpy() for chunk in chunks())
    if len(repeated) == 0:
        return
    for chunk in chunks():
        mask = np.isin(chunk.column("hash").to_numpy(), repeated)
        if mask.any():
            yield chunk.filter(pa.array(mask))


def _repeated(hash_arrays) -> np.ndarray:
    """The hashes seen more than once over `hash_arrays` (taken one at a time: memory follows the
    distinct hashes, not the rows), sorted. By sorting: numpy's `unique` hashes 64-bit numbers,
    several times slower than sorting them."""
    seen, repeated = np.empty(0, np.uint64), []
    for hashes in hash_arrays:
        distinct, within = _distinct(np.sort(hashes))
        if len(seen):
            distinct, across = _distinct(np.sort(np.concatenate([seen, distinct])))
            repeated.append(across)
        repeated.append(within)
        seen = distinct
    return _distinct(np.sort(np.concatenate(repeated)))[0] if repeated else seen


def _distinct(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sorted array's distinct values, and the values it holds more than once (with repeats)."""
    first = np.ones(len(ordered), bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return ordered[first], ordered[~first]


def _duplicates(chunks) -> pa.Table:
    """The ids seen more than once among the (id, seq) tables `chunks`: id, n, first and last seq.

    Chunks are counted one at a time and the counts merged, so memory follows the distinct ids,
    not the rows: the same id a million times takes one row of the counts."""
    counts = None
    for chunk in chunks:
        part = chunk.select(["id", "seq"]).group_by("id", use_threads=False).aggregate(
            [("seq", "count"), ("seq", "min"), ("seq", "max")])
        part = part.rename_columns({"seq_count": "n", "seq_min": "first", "seq_max": "last"})
        if counts is not None:
            part = pa.concat_tables([counts, part]).group_by("id", use_threads=False).aggregate(
                [("n", "sum"), ("first", "min"), ("last", "max")]
            ).rename_columns({"n_sum": "n", "first_min": "first", "last_max": "last"})
        counts = part
    if counts is None:
        return pa.table({"id": pa.array([], pa.large_string()), "n": pa.array([], pa.int64()),
                         "first": pa.array([], pa.int64()), "last": pa.array([], pa.int64())})
    return counts.filter(pc.greater(counts.column("n"), 1))


class _Partitions:
    """The ids of the inputs, spread over `count` partitions by a hash of their text.

    One partition: the ids stay in memory (the inputs hold no more than one partition's rows).
    More: ids wait in a buffer of at most `partition_rows` rows, which is then split by partition
    and appended to each partition's Arrow IPC spill file in a temporary folder, removed at the end.
    `partitions()` gives each partition in turn as chunks of about `partition_rows` rows."""

    def __init__(self, count: int, partition_rows: int):
        self.count, self.partition_rows = count, partition_rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.folder = tempfile.TemporaryDirectory(prefix="id-check-") if count > 1 else None
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for writer in self.writers.values():
            writer.close()
        if self.folder is not None:
            self.folder.cleanup()

    def add(self, ids: pa.Array, seq: np.ndarray) -> None:
        hashes = _hashes(ids)
        columns = {"id": ids, "seq": pa.array(seq), "hash": pa.array(hashes)}
        if self.count > 1:
            columns["part"] = pa.array((hashes % np.uint64(self.count)).astype(np.int32))
        self.buffer.append(pa.table(columns))
        self.buffered += len(ids)
        if self.count > 1 and self.buffered >= self.partition_rows:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self.buffer)
        self.buffer, self.buffered = [], 0
        parts = table.column("part").to_numpy()
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(self.count + 1))
        table = table.select(_SCHEMA.names).take(pa.array(order))
        for part in range(self.count):
            if bounds[part + 1] > bounds[part]:
                if part not in self.writers:
                    self.writers[part] = pa.ipc.new_stream(self._path(part), _SCHEMA)
                self.writers[part].write_table(table.slice(bounds[part], bounds[part + 1] - bounds[part]))

    def _path(self, part: int) -> str:
        return os.path.join(self.folder.name, f"{part}.arrow")

    def partitions(self):
        """Each partition, one after the other, as a function giving an iterator over its chunks
        (tables), anew at each call."""
        if self.count == 1:
            table = pa.concat_tables(self.buffer) if self.buffer else _SCHEMA.empty_table()
            self.buffer = []
            yield lambda: iter([table.select(_SCHEMA.names)])
            return
        if self.buffer:
            self._flush()
        parts, writers, self.writers = sorted(self.writers), self.writers.values(), {}
        for writer in writers:
            writer.close()
        for part in parts:
            yield lambda part=part: self._read(part)

    def _read(self, part: int):
        batches, rows = [], 0
        with pa.OSFile(self._path(part)) as source, pa.ipc.open_stream(source) as reader:
            for batch in reader:
                if batches and rows + batch.num_rows > self.partition_rows:
                    yield pa.Table.from_batches(batches, _SCHEMA)
                    batches, rows = [], 0
                batches.append(batch)
                rows += batch.num_rows
        if batches:
            yield pa.Table.from_batches(batches, _SCHEMA)


def _hashes(ids: pa.Array) -> np.ndarray:
    """Each id's 64-bit hash of its UTF-8 text (pandas' vectorised SipHash): its partition (modulo
    the partitions' count), and what a partition's rows are first counted by."""
    from pandas.util import hash_array  # imported only when a check runs

    return hash_array(ids.to_numpy(zero_copy_only=False), categorize=False)


def _as_text(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An id column as text, the way row ids are written (`str` of the value)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return column.cast(pa.large_string())
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t)):  # binary ids are UTF-8 text, as the read tasks decode them
        return pa.array([None if v is None else v.decode("utf-8", "backslashreplace") for v in column.to_pylist()],
                        pa.large_string())
    return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.large_string())
