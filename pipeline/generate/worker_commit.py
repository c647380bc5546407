"""Parts committed by the engine workers, and the ledger entries the driver keeps of them
(`output.commit=workers`).

With `output.commit=driver` every answered row travels through Ray Data to the one driver,
which commits it (`pipeline.generate.sinks`); Ray Data's delivery to one process caps that at a
few thousand rows a second (docs/benchmark.md, "The driver's limits"). With `workers`, each
engine worker commits the part of each batch it answered itself, through the same code as the
driver (`part_files.write_named_part` on a local folder, `store_output.stage_part` and
`publish_staged` on an object store: a hidden or staged name, checked, then published whole,
never over an existing part), and hands Ray Data only the part's ledger entry: its name, row
count, the input rows it covers (`coverage.part_entry`), what `RunStats` counts of it
(`stats.batch_counts`) and the node that answered it. The driver records entries
(`OutputDir.record`), never rows; the exactly-once check of `OutputDir.finish` runs on them and
`manifest.json` is still written last, by the driver, which keeps the folder's lock throughout.

Exactly once when Ray does a batch twice (its worker died after committing, before returning):
a part is named by a digest of the rows it holds (`part_files.batch_part_name`), so the second
attempt finds the name taken, drops its copy and returns the entry of the part that is there
(read back from it), and the driver ignores an entry it already has. A rerun after the driver
died resumes from the parts on disk as with driver commits.

Pure module: pyarrow and the project's pure output modules.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.generate.coverage import part_entry
from pipeline.generate.part_files import batch_part_name, write_named_part
from pipeline.generate.sinks import PARTS
from pipeline.generate.stats import batch_counts

# The column an engine worker returns instead of its rows: one JSON ledger entry per part.
LEDGER_COLUMN = "_ledger"
LEDGER_SCHEMA = pa.schema([pa.field(LEDGER_COLUMN, pa.string())])
# What of a part is read back to describe it when a redone batch finds it already committed.
_ENTRY_COLUMNS = ["source_file", "source_row", "error", "prompt_tokens", "completion_tokens", "finish_reason",
                  "tool_parse"]


def ledger_entry(name: str, table: pa.Table, node: str | None = None) -> dict:
    """The ledger entry of part `name` holding `table`: its manifest entry (`file`, `rows`,
    `covers`), its `counts` for `RunStats.add_counts`, and the `node` that answered it."""
    return {**part_entry(f"{PARTS}/{name}", table), "counts": batch_counts(table), "node": node}


def ledger_table(entries: list[dict]) -> pa.Table:
    """What an engine worker returns to Ray Data in place of its rows."""
    return pa.table({LEDGER_COLUMN: [json.dumps(e, separators=(",", ":")) for e in entries]}, schema=LEDGER_SCHEMA)


def read_ledger(batch: pa.Table) -> list[dict]:
    """The ledger entries in a batch the driver takes from Ray Data."""
    return [json.loads(text) for text in batch.column(LEDGER_COLUMN).to_pylist()]


# At most this many engine batches in one Ray Data task with worker commits (`batches_per_task`).
MAX_BATCHES_PER_TASK = 16
# ... and at least this many tasks per place an engine has for a batch, so that the engines
# stay full to the end of the job.
TASKS_PER_SLOT = 4


def batches_per_task(planned_rows: int, batch_size: int, batches_in_flight: int, workers: int) -> int:
    """Engine batches per Ray Data task with worker commits.

    What one driver spends is Ray Data's per task and per block (scheduling each engine task,
    taking each output block), not per row (docs/benchmark.md, "The driver's limits"). With
    driver commits a task is one batch, so rows reach the driver (and are committed) a batch at a
    time. With worker commits, a task of k batches commits each batch as it finishes and returns
    k ledger entries in one block: k times fewer tasks and blocks for the driver. The engine
    still holds `batches_in_flight` batches at once (one per task in flight), so k is capped where
    the job has too few rows to give every engine slot `TASKS_PER_SLOT` tasks."""
    slots = max(1, batch_size * batches_in_flight * workers * TASKS_PER_SLOT)
    return max(1, min(MAX_BATCHES_PER_TASK, planned_rows // slots))


class PartCommitter:
    """Commits one batch's rows as a part of its own, from an engine worker; picklable (the
    driver makes it with `OutputDir.committer()` and Ray ships it to every worker)."""

    def committed(self, name: str, node: str | None = None) -> dict | None:
        """The ledger entry of part `name` if it is already committed (a batch Ray redoes after
        its worker died, found before it is generated again), else None."""
        return ledger_entry(name, self._read(name), node) if self._exists(name) else None

    def commit(self, table: pa.Table, node: str | None = None) -> dict:
        """Commit `table` as part `batch_part_name(table)`; its ledger entry. If that part exists
        (this batch was committed before, by a worker that died before returning), this copy
        is dropped and the entry describes the part that is there."""
        name = batch_part_name(table)
        if not self._publish(name, table):
            table = self._read(name)
        return ledger_entry(name, table, node)

    def _publish(self, name: str, table: pa.Table) -> bool:
        raise NotImplementedError

    def _read(self, name: str) -> pa.Table:
        raise NotImplementedError

    def _exists(self, name: str) -> bool:
        raise NotImplementedError


class LocalParts(PartCommitter):
    """Parts in a local (or shared) folder: written hidden, synced, published by a hard link
    that fails rather than replace (`part_files.write_named_part`), while the driver that
    started the worker still holds the folder's lock (`folder_lock.check_folder_holder`)."""

    def __init__(self, folder: str, parts_dir: str, token: str | None):
        self.folder, self.parts_dir = folder, parts_dir
        self.token = token  # the driver's, recorded in <folder>/.lock

    def _publish(self, name: str, table: pa.Table) -> bool:
        from pipeline.generate.folder_lock import check_folder_holder

        return write_named_part(self.parts_dir, name, table, lambda: check_folder_holder(self.folder, self.token))

    def _read(self, name: str) -> pa.Table:
        return pq.read_table(os.path.join(self.parts_dir, name), columns=_ENTRY_COLUMNS)

    def _exists(self, name: str) -> bool:
        return os.path.lexists(os.path.join(self.parts_dir, name))


class StoreParts(PartCommitter):
    """Parts on an object store: staged under `.staging/<lease token>/`, checked, then copied into
    parts/ if the name is free and the driver still holds the folder's lease
    (`store_output.publish_staged`, `folder_lock.check_lease`)."""

    def __init__(self, location, token: str | None):
        self.location = location  # the output folder, a pipeline.storage.Location
        self.token = token  # the driver's lease on it

    def _publish(self, name: str, table: pa.Table) -> bool:
        from pipeline.generate.folder_lock import check_lease
        from pipeline.generate.store_output import STAGING, publish_staged, stage_part

        final = self.location.join(PARTS, name)
        if final.exists():
            return False  # checked before writing too: a redone batch costs no upload
        staged = self.location.join(STAGING, self.token or "unlocked", f"{name}.{os.urandom(8).hex()}")
        stage_part(staged, table)
        return publish_staged(staged, final, lambda: check_lease(self.location, self.token))

    def _read(self, name: str) -> pa.Table:
        loc = self.location.join(PARTS, name)
        return pq.read_table(loc.path, columns=_ENTRY_COLUMNS, filesystem=loc.filesystem)

    def _exists(self, name: str) -> bool:
        return self.location.join(PARTS, name).exists()
