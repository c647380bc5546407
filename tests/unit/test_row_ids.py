"""The duplicate-id check: the same answer whether the ids fit one partition or are spilled to many."""

from __future__ import annotations

import collections
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.generate import row_ids
from pipeline.generate.planning import InputError, plan_shards
from pipeline.generate.row_ids import derived_row_id, duplicate_ids


def write_files(folder, id_lists, row_group_size=None):
    """One file per list of ids, named f0.parquet, f1.parquet, ...; the paths in order."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, ids in enumerate(id_lists):
        path = os.path.join(folder, f"f{i}.parquet")
        table = pa.table({"uid": pa.array(ids, pa.string()), "prompt": ["p"] * len(ids)})
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def expected_message(paths, id_lists):
    """The check's message written out by hand: every row's id (null -> file#row), the duplicated
    ones in the order their first row appears, with the first and last file holding them."""
    seen = collections.defaultdict(list)  # id -> indices of the files holding it, in row order
    for index, ids in enumerate(id_lists):
        for row, value in enumerate(ids):
            seen[derived_row_id(f"f{index}.parquet", row) if value is None else value].append(index)
    dups = [(value, where) for value, where in seen.items() if len(where) > 1]
    if not dups:
        return []
    shown = ", ".join(f"'{v}' (f{w[0]}.parquet and f{w[-1]}.parquet)" for v, w in dups[:5])
    more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
    return [
        f"id_column 'uid': {len(dups)} duplicate id(s): {shown}{more}; make the ids unique, or set "
        "id_column=null to use file#row ids (a row with a null id is given its file#row id, which must "
        "not be another row's id either)"
    ]


@pytest.fixture
def spill_folders(monkeypatch):
    """The temporary folders the check makes for its spill files, as it makes them."""
    folders = []
    real = row_ids.tempfile.TemporaryDirectory
    monkeypatch.setattr(row_ids.tempfile, "TemporaryDirectory", lambda **kw: folders.append(real(**kw)) or folders[-1])
    return folders


def check(folder, paths, partition_rows):
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    return duplicate_ids(paths, str(folder), "uid", total, partition_rows=partition_rows)


def test_duplicates_across_files_and_partitions_are_all_found(tmp_path):
    id_lists = [[f"a{i}" for i in range(300)] + ["dup-1", "x"],
                [f"b{i}" for i in range(300)] + ["dup-1", "dup-2"],
                [f"c{i}" for i in range(300)] + ["dup-2", "x", "a7"]]
    paths = write_files(tmp_path, id_lists, row_group_size=50)
    spilled = check(tmp_path, paths, partition_rows=64)  # 15 partitions
    assert spilled == check(tmp_path, paths, partition_rows=10_000) == expected_message(paths, id_lists)
    assert "4 duplicate id(s): 'a7' (f0.parquet and f2.parquet), 'dup-1' (f0.parquet and f1.parquet), " \
           "'x' (f0.parquet and f2.parquet), 'dup-2' (f1.parquet and f2.parquet);" in spilled[0]


def test_a_null_ids_derived_id_collides_with_a_real_id_in_another_partition(tmp_path):
    id_lists = [[f"r{i}" for i in range(200)], ["f0.parquet#5", None, None, "r3"] + [f"s{i}" for i in range(200)]]
    id_lists[0][5] = None  # f0's row 5 takes the id f0.parquet#5, which f1 also holds
    paths = write_files(tmp_path, id_lists)
    message = check(tmp_path, paths, partition_rows=50)
    assert message == expected_message(paths, id_lists)
    assert "2 duplicate id(s): 'r3' (f0.parquet and f1.parquet), 'f0.parquet#5' (f0.parquet and f1.parquet)" \
        in message[0]


def test_one_id_repeated_in_every_row_is_counted_without_holding_every_row(tmp_path, monkeypatch):
    """An id column of one constant value puts every row in one partition: it is counted a chunk
    at a time, and the count of that id is one row however many rows carry it."""
    monkeypatch.setattr(row_ids, "READ_ROWS", 100)
    id_lists = [["same"] * 1000 + [f"u{i}" for i in range(1000)], ["same"] * 500]
    paths = write_files(tmp_path, id_lists, row_group_size=250)
    chunks = []
    real = row_ids._duplicates
    monkeypatch.setattr(row_ids, "_duplicates", lambda tables: real(chunks.append(list(tables)) or chunks[-1]))
    message = check(tmp_path, paths, partition_rows=300)
    assert message == expected_message(paths, id_lists)
    assert "1 duplicate id(s): 'same' (f0.parquet and f1.parquet)" in message[0]
    assert max(t.num_rows for tables in chunks for t in tables) < 300 + 100  # a chunk: one partition's bound


def test_more_than_five_duplicates_are_counted_and_five_shown_in_input_order(tmp_path):
    id_lists = [[f"k{i}" for i in range(40)], [f"k{i}" for i in reversed(range(0, 40, 3))]]
    paths = write_files(tmp_path, id_lists)
    message = check(tmp_path, paths, partition_rows=8)
    assert message == expected_message(paths, id_lists) == check(tmp_path, paths, partition_rows=1000)
    assert "14 duplicate id(s): 'k0' (f0.parquet and f1.parquet), 'k3' (f0.parquet and f1.parquet), 'k6'" in message[0]
    assert message[0].count("(f0.parquet and f1.parquet)") == 5 and " and 9 more;" in message[0]


def test_unique_ids_over_many_partitions_pass_and_the_spill_is_removed(tmp_path, spill_folders):
    paths = write_files(tmp_path, [[f"id-{f}-{i}" for i in range(500)] for f in range(4)], row_group_size=100)
    assert check(tmp_path, paths, partition_rows=100) == []
    assert len(spill_folders) == 1 and not os.path.exists(spill_folders[0].name)
    assert check(tmp_path, paths, partition_rows=2000) == [] and len(spill_folders) == 1  # one partition: no spill


def test_plan_shards_spills_when_the_inputs_hold_more_than_one_partition(tmp_path, monkeypatch, spill_folders):
    monkeypatch.setattr(row_ids, "PARTITION_ROWS", 10)
    id_lists = [[f"q{i}" for i in range(30)], ["q29", None]]
    write_files(tmp_path / "in", id_lists)
    with pytest.raises(InputError, match=r"1 duplicate id\(s\): 'q29' \(f0.parquet and f1.parquet\)"):
        plan_shards(str(tmp_path / "in"), id_column="uid")
    assert len(spill_folders) == 1 and not os.path.exists(spill_folders[0].name)


def test_only_rows_sharing_a_hash_are_counted_by_their_text(tmp_path, monkeypatch):
    """Unique ids never reach the count by text: each partition's hashes are counted first, and
    only the rows whose hash another row shares (here the duplicates, and nothing else) go on."""
    id_lists = [[f"u{i}" for i in range(400)] + ["dup"], [f"v{i}" for i in range(400)] + ["dup"]]
    paths = write_files(tmp_path, id_lists, row_group_size=100)
    counted = []

    def spy(tables, real=row_ids._duplicates):
        tables = list(tables)
        counted.extend(tables)
        return real(tables)

    monkeypatch.setattr(row_ids, "_duplicates", spy)
    for partition_rows in (64, 10_000):  # spilled to 16 partitions, and all in memory
        counted.clear()
        assert check(tmp_path, paths, partition_rows) == expected_message(paths, id_lists)
        assert sorted(v for t in counted for v in t.column("id").to_pylist()) == ["dup", "dup"]


def test_hashes_repeated_within_and_across_chunks_are_found_once_each():
    chunks = [[5, 1, 9, 1], [7, 5, 3], [3, 3, 2], [11]]
    repeated = row_ids._repeated(np.array(c, np.uint64) for c in chunks)
    assert repeated.tolist() == [1, 3, 5] and repeated.dtype == np.uint64
    assert row_ids._repeated(iter([])).tolist() == []
    assert row_ids._repeated([np.arange(9, dtype=np.uint64)]).tolist() == []


@pytest.mark.parametrize("collide", [lambda h: h * 0, lambda h: h % 3])
def test_ids_that_only_share_a_hash_are_not_duplicates(tmp_path, monkeypatch, collide):
    """Every id given the same hash, or one of three: each row is then a candidate, and the count
    by text still finds exactly the real duplicates (and no others)."""
    real = row_ids._hashes
    monkeypatch.setattr(row_ids, "_hashes", lambda ids: collide(real(ids)))
    id_lists = [[f"a{i}" for i in range(120)] + ["dup", None],
                [f"b{i}" for i in range(120)] + ["dup", "f0.parquet#121"]]
    paths = write_files(tmp_path, id_lists, row_group_size=50)
    for partition_rows in (40, 10_000):
        message = check(tmp_path, paths, partition_rows)
        assert message == expected_message(paths, id_lists)
        assert "2 duplicate id(s): 'dup' (f0.parquet and f1.parquet), 'f0.parquet#121'" in message[0]
    assert check(tmp_path, write_files(tmp_path / "u", [[f"u{i}" for i in range(300)]]), 40) == []


ids = st.one_of(st.none(), st.sampled_from(["a", "b", "f0.parquet#1", "f1.parquet#0", "é", ""]),
                st.text(min_size=0, max_size=6))


@settings(max_examples=40, deadline=None)
@given(id_lists=st.lists(st.lists(ids, min_size=0, max_size=30), min_size=1, max_size=4),
       partition_rows=st.integers(1, 40), read_rows=st.integers(1, 16))
def test_spilled_check_equals_the_in_memory_check_on_random_ids(tmp_path_factory, id_lists, partition_rows, read_rows):
    folder = tmp_path_factory.mktemp("ids")
    paths = write_files(folder, id_lists, row_group_size=7)
    old = row_ids.READ_ROWS
    row_ids.READ_ROWS = read_rows
    try:
        spilled = check(folder, paths, partition_rows)
    finally:
        row_ids.READ_ROWS = old
    assert spilled == check(folder, paths, 10**9) == expected_message(paths, id_lists)
