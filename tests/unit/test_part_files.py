"""Part files: numeric indices past five digits, hidden temporary names, and a finished part
published under a free name, never over an existing file (with or without hard links)."""

from __future__ import annotations

import errno
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate import part_files
from pipeline.generate.part_files import part_index, part_name, tmp_name, write_part


def table(*rows: int) -> pa.Table:
    return pa.table({"source_file": ["in.parquet"] * len(rows), "source_row": list(rows)})


def test_names_and_indices():
    assert part_name(7) == "part-00007.parquet" and part_name(100000) == "part-100000.parquet"
    assert part_index("part-00042.parquet") == 42 and part_index("part-100000.parquet") == 100000
    names = ["part-100000.parquet", "notes.md", "part-99999.parquet", "part-x.parquet"]
    assert sorted(names, key=part_index)[:2] == ["part-99999.parquet", "part-100000.parquet"]


def test_tmp_name_is_hidden_beside_its_target(tmp_path):
    name = tmp_name(str(tmp_path / "parts" / "part-00003.parquet"))
    assert os.path.dirname(name) == str(tmp_path / "parts")
    assert re.fullmatch(r"\.part-00003\.parquet\.tmp-[0-9a-f]{32}", os.path.basename(name))


def test_write_part_takes_the_next_free_name(tmp_path):
    (tmp_path / "part-00000.parquet").write_text("not ours")
    assert write_part(str(tmp_path), 0, table(0, 1)) == 1
    assert (tmp_path / "part-00000.parquet").read_text() == "not ours"
    assert pq.read_table(tmp_path / "part-00001.parquet")["source_row"].to_pylist() == [0, 1]
    assert write_part(str(tmp_path), 5, table(2)) == 5
    assert sorted(os.listdir(tmp_path)) == ["part-00000.parquet", "part-00001.parquet", "part-00005.parquet"]


def test_without_hard_links_the_part_is_renamed_into_a_free_name(tmp_path, monkeypatch):
    (tmp_path / "part-00000.parquet").write_text("not ours")

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(part_files.os, "link", no_link)
    assert write_part(str(tmp_path), 0, table(0)) == 1
    assert (tmp_path / "part-00000.parquet").read_text() == "not ours"
    assert sorted(os.listdir(tmp_path)) == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.read_table(tmp_path / "part-00001.parquet")["source_row"].to_pylist() == [0]


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def broken_link(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(part_files.os, "link", broken_link)
    with pytest.raises(OSError, match="Input/output error"):
        write_part(str(tmp_path), 0, table(0))
    assert os.listdir(tmp_path) == []
