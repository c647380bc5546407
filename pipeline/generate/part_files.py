"""Part files: their names, and publishing a finished part without ever writing over another.

A part is `parts/part-<index>.parquet`. Indices have at least five digits and are parsed as
numbers, so part 100000 follows part 99999. A part is written under a hidden temporary name
(`tmp_name`), synced, and then published under the next free `part-<index>` name with
`os.link`, which fails rather than replace an existing name: a part is never written over, not
even a file someone else put there.

Pure module: stdlib + pyarrow.
"""

from __future__ import annotations

import errno
import os
import re
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

PART_FILE = re.compile(r"^part-(\d+)\.parquet$")
# os.link fails with these where the filesystem has no hard links (FAT, some network and FUSE
# filesystems); the part is then published by an existence check and a rename, which is safe
# as long as the folder's lock (`pipeline.generate.folder_lock`) keeps other writers out.
_NO_HARD_LINKS = {
    getattr(errno, name) for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "EXDEV", "ENOSYS") if hasattr(errno, name)
}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def part_index(name: str) -> int:
    """part-00042.parquet -> 42; a name that is not a part's sorts last."""
    match = PART_FILE.match(name)
    return int(match.group(1)) if match else 1 << 62


def tmp_name(path: str) -> str:
    """Where `path` is written before it is renamed into place: hidden (a leading dot), so that a
    reader of the folder (pyarrow skips '.' and '_' files) never sees a half-written file, even
    one a killed job left behind."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")


def write_part(parts_dir: str, index: int, table: pa.Table) -> int:
    """Write `table` into `parts_dir` as part `index`, or the first free index after it when that
    name is taken; return the index it got."""
    tmp = tmp_name(os.path.join(parts_dir, part_name(index)))
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        while not _publish_new(tmp, os.path.join(parts_dir, part_name(index))):
            index += 1  # the name is taken: a part is never written over
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return index


def _publish_new(tmp: str, final: str) -> bool:
    """Give the finished file `tmp` the name `final` unless that name exists; True if it did."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(final):
            return False
        os.replace(tmp, final)
        return True
    os.remove(tmp)
    return True
