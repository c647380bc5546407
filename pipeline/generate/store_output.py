"""The job's output folder on an object store (`output.path=s3://bucket/run`, `gs://...`, any
fsspec URI), with the local folder's guarantees (`pipeline.generate.sinks`).

    <output>/.lock                              the writer's lease (folder_lock.ObjectStoreLock)
    <output>/job.json                           one PUT, before any part
    <output>/.staging/<run>/part-00007.parquet  a part being written
    <output>/parts/part-00007.parquet           the part, committed: a server-side copy of the
                                                staged object, which appears whole
    <output>/manifest.json                      written last: its presence means the job finished

Object stores have no rename, and a file being written may be listed on stores other than
S3 and GCS. A part is therefore written under the hidden `.staging/` prefix, its footer read
back (the row count it was written with), and only then copied to its final name in `parts/`
with the store's own copy (S3 CopyObject, GCS rewrite: the object appears whole or not at
all), after checking that the name is free and that this run still holds the folder. The
copy is the commit: a part in `parts/` is complete and its rows count as done, so a reader
of `<output>/parts` never sees a half-written or an uncommitted part. A killed run leaves at
most a staged object, which the next run deletes (with the lease held); committed parts
record their input rows, so the rerun generates exactly the rest.

With `output.commit=workers` each engine worker commits its batches' parts the same way
(`pipeline.generate.worker_commit.StoreParts`): staged under the driver's lease token, copied
into `parts/` only while that lease is the driver's; `finish()` deletes what dead workers left
staged before it writes the manifest.

JSON files are single PUTs: an object appears whole. Deletions are limited to what the local
folder deletes (sinks' module docstring), with `.staging/` in place of the hidden temporary
files.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.generate.folder_lock import ObjectStoreLock
from pipeline.generate.part_files import PART_FILE, part_index, part_name
from pipeline.generate.sinks import JOB, MANIFEST, PARTS, REPORT, OutputDir, OutputError

STAGING = ".staging"


class StoreOutputDir(OutputDir):
    """`OutputDir` on a store without rename or file locks; see the module docstring."""

    def __init__(self, path: str, *, overwrite: bool = False, rows_per_part: int = 1024,
                 lock_options: dict | None = None):
        self.location = storage.resolve(path, "output.path")
        self._lock_options = lock_options or {}
        super().__init__(self.location.uri, overwrite=overwrite, rows_per_part=rows_per_part)

    @property
    def shown(self) -> str:
        return self.location.shown

    def _at(self, uri: str) -> storage.Location:
        """The Location of a URI below the folder (on the folder's filesystem, not a new one)."""
        return self.location.join(self._relative(uri))

    def _make_lock(self):
        return ObjectStoreLock(self.location, error=OutputError, **self._lock_options)

    def _relative(self, path: str) -> str:
        return path[len(self.location.uri):].lstrip("/")

    def _exists(self, path: str) -> bool:
        return self._at(path).exists()

    def _read_text(self, path: str) -> str:
        return self._at(path).read_text()

    def _write_json(self, path: str, data: dict) -> None:
        self._lock.check()
        self._at(path).write_text(json.dumps(data, indent=2, default=str) + "\n")

    def _read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        loc = self._at(path)
        return pq.read_table(loc.path, columns=columns, filesystem=loc.filesystem)

    def _is_part(self, path: str) -> bool:
        return self._at(path).is_file()

    def _parts_dir(self) -> str:
        return self._file(PARTS)

    def _make_parts_dir(self) -> None:
        pass  # object stores have no folders to make

    def _part_names(self) -> list[str]:
        return [f.name for f in self.location.join(PARTS).children()
                if PART_FILE.match(f.name) and f.is_file()]

    def part_files(self) -> list[str]:
        return [self._file(f"{PARTS}/{n}") for n in sorted(self._part_names(), key=part_index)]

    def _looks_like_output(self) -> bool:
        return self._exists(self._file(MANIFEST)) or bool(self._part_names())

    def _leftovers(self) -> list[str]:
        return [f.uri for f in self.location.join(STAGING).files()]

    def _remove_leftovers(self) -> None:
        self.location.join(STAGING).delete()

    def _remove_own_leftovers(self) -> None:
        # Staged objects of this run's workers that died before publishing (output.commit=workers).
        self.location.join(STAGING, self._lock.token or "unlocked").delete()

    def _remove_previous_output(self) -> None:
        for name in (JOB, MANIFEST, REPORT):
            self.location.join(name).delete()
        for path in self.part_files():
            self._at(path).delete()
        self._remove_leftovers()

    def _commit_part(self, table: pa.Table) -> str:
        index = self._next_index()
        staged = self.location.join(STAGING, self._lock.token or "unlocked", part_name(index))
        stage_part(staged, table)
        while self.location.join(PARTS, part_name(index)).exists():
            index += 1  # the name is taken: a part is never written over
        publish_staged(staged, self.location.join(PARTS, part_name(index)), self._lock.check)
        self._next = index + 1
        return f"{PARTS}/{part_name(index)}"

    def committer(self):
        from pipeline.generate.worker_commit import StoreParts

        return StoreParts(self.location, self._lock.token)


def stage_part(staged: storage.Location, table: pa.Table) -> None:
    """Write `table` to the staging object `staged` and read its footer back: it must hold the
    rows it was written with before it may be copied into parts/."""
    fs = staged.filesystem
    pq.write_table(table, staged.path, filesystem=fs)
    with fs.open_input_file(staged.path) as f:
        written = pq.ParquetFile(f).metadata.num_rows
    if written != table.num_rows:
        raise OSError(f"{staged.shown} holds {written} rows after writing {table.num_rows}")


def publish_staged(staged: storage.Location, final: storage.Location, check_lease) -> bool:
    """Copy the staged part to `final` (the store's own copy: the object appears whole) unless
    that name exists, once `check_lease()` confirms the run still holds the folder; the staged
    object is deleted either way. True if this call published it."""
    try:
        if final.exists():
            return False
        check_lease()
        staged.filesystem.copy_file(staged.path, final.path)
        return True
    finally:
        staged.delete()
