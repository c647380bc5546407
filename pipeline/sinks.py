"""The job's output folder: Parquet parts committed whole, and `manifest.json` written last.

    <output>/parts/part-00000.parquet ...   committed by rename: a part on disk is always complete
    <output>/manifest.json                  written last: its presence means the job finished

The parts have a folder of their own so that any Parquet reader can be pointed at it
(`pyarrow.parquet.read_table("<output>/parts")`) without tripping over the manifest.

Pure module: stdlib + pyarrow.
"""

from __future__ import annotations

import glob
import json
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
PARTS = "parts"
PART_GLOB = "parts/part-*.parquet"


class OutputError(ValueError):
    pass


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(path: str, table: pa.Table) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class OutputDir:
    def __init__(self, path: str, *, overwrite: bool = False, rows_per_part: int = 1024):
        self.path = path
        self.overwrite = overwrite
        self.rows_per_part = rows_per_part
        self.parts: list[dict] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def begin(self, settings: dict, plan) -> None:
        """Claim the folder: refuse to mix this job's rows with another's."""
        self.rows_per_part = settings["output"]["rows_per_part"]
        existing = self._existing_files()
        if existing and not self.overwrite:
            what = "a finished job (manifest.json)" if os.path.exists(self._file(MANIFEST)) else "another job's parts"
            raise OutputError(
                f"output.path '{self.path}' already holds {what}; choose another output.path "
                "or set output.overwrite=true to replace it"
            )
        for path in existing:
            os.remove(path)
        os.makedirs(self._file(PARTS), exist_ok=True)

    def _existing_files(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        names = glob.glob(self._file(PART_GLOB)) + glob.glob(self._file("parts/*.tmp-*")) + glob.glob(self._file("*.tmp-*"))
        if os.path.exists(self._file(MANIFEST)):
            names.append(self._file(MANIFEST))
        return sorted(names)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

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
        name = f"{PARTS}/part-{len(self.parts):05d}.parquet"
        write_parquet_atomic(self._file(name), table)
        self.parts.append({"file": name, "rows": table.num_rows})
        self._pending, self._pending_rows = [], 0

    def finish(self, settings: dict, plan, stats, *, started: float, versions: dict) -> dict:
        self.flush()
        finished = time.time()
        manifest = {
            "status": "complete",
            "started_at": _iso(started),
            "finished_at": _iso(finished),
            "config": settings,
            "versions": versions,
            "inputs": {"files": list(plan.files), "fingerprints": plan.fingerprints},
            "counts": stats.counts(),
            "tokens": stats.tokens(),
            "wall_time_s": round(finished - started, 3),
            "throughput": stats.throughput(finished - started),
            "parts": self.parts,
        }
        write_json_atomic(self._file(MANIFEST), manifest)
        return manifest


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
