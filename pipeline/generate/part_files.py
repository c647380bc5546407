"""Part files: their names, and publishing a finished part without ever writing over another.

A part the driver commits is `parts/part-<index>.parquet`. Indices have at least five digits
and are parsed as numbers, so part 100000 follows part 99999. A part an engine worker commits
(`output.commit=workers`, `pipeline.generate.worker_commit`) is `parts/part-w<32 hex>.parquet`,
named by a digest of the (input file, row, sample) keys it holds (`batch_part_name`), so that
a batch done twice gets the same name twice. Both kinds are parts everywhere parts are read
(`PART_FILE`); numbered parts sort first, by index, then named ones by name (`part_sort_key`).

A part is written under a hidden temporary name (`tmp_name`), synced, and then published with
`os.link`, which fails rather than replace an existing name: a part is never written over, not
even a file someone else put there. A numbered part then takes the next free index; a named
part whose name is taken is dropped, since the part there holds the same rows.

Pure module: stdlib + pyarrow.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

PART_FILE = re.compile(r"^part-(?:(\d+)|w[0-9a-f]{32})\.parquet$")
# What `tmp_name` makes of a part's name: the leftovers a stopped run may leave in parts/.
PART_LEFTOVER = re.compile(r"^\.part-(?:\d{5,}|w[0-9a-f]{32})\.parquet\.tmp-[0-9a-f]{32}$")
# os.link fails with these where the filesystem has no hard links (FAT, some network and FUSE
# filesystems); the part is then published by an existence check and a rename, which is safe
# as long as the folder's lock (`pipeline.generate.folder_lock`) keeps other writers out.
_NO_HARD_LINKS = {
    getattr(errno, name) for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "EXDEV", "ENOSYS") if hasattr(errno, name)
}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def part_index(name: str) -> int:
    """part-00042.parquet -> 42; a named part (`part-w<hex>`), or a name that is not a part's,
    sorts last."""
    match = PART_FILE.match(name)
    return int(match.group(1)) if match and match.group(1) is not None else 1 << 62


def is_numbered(name: str) -> bool:
    """A part the driver numbered (`part-<index>`), as opposed to one a worker named."""
    match = PART_FILE.match(name)
    return bool(match and match.group(1) is not None)


def part_sort_key(name: str) -> tuple[int, str]:
    """The order of parts in listings and the manifest: numbered parts by index, then named
    parts by name (which does not depend on the order they were committed in)."""
    return part_index(name), name


def batch_part_name(table: pa.Table) -> str:
    """`part-w<32 hex>.parquet`: the name of the part holding exactly `table`'s rows, from a digest
    of their (source_file, source_row, sample) keys in sorted order. The same rows give the same
    name whichever worker answers them and however often: a batch redone after its worker died
    finds its part already there."""
    samples = table.column("sample").to_pylist() if "sample" in table.column_names else [0] * table.num_rows
    return keys_part_name(table.column("source_file").to_pylist(), table.column("source_row").to_pylist(), samples)


def keys_part_name(sources: list[str], rows: list[int], samples: list[int]) -> str:
    """`batch_part_name` from the keys themselves (known before a batch is generated)."""
    digest = hashlib.sha256()
    for source, row, sample in sorted(zip(sources, rows, samples)):
        digest.update(f"{source}\x00{row}\x00{sample}\n".encode())
    return f"part-w{digest.hexdigest()[:32]}.parquet"


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


def write_named_part(parts_dir: str, name: str, table: pa.Table, check=None) -> bool:
    """Write `table` into `parts_dir` as `name` unless a part of that name exists (it is then
    left as it is and this copy dropped), once `check()` (if given) allows it; True if this
    call published it."""
    tmp = tmp_name(os.path.join(parts_dir, name))
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if check is not None:
            check()
        return _publish_new(tmp, os.path.join(parts_dir, name))
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


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
