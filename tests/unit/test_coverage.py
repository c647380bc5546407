"""Row ranges per part, and the exactly-once check over them: every gap, duplicate and stray row
named, in time that grows with the ranges, not the rows."""

from __future__ import annotations

import time

import pyarrow as pa

from pipeline.generate.coverage import check_exactly_once, part_entry


def test_part_entry_records_ranges_per_input_file():
    table = pa.table({"source_file": ["b", "a", "a", "a", "a", "b"], "source_row": [4, 7, 2, 1, 3, 4]})
    assert part_entry("parts/part-00003.parquet", table) == {
        "file": "parts/part-00003.parquet",
        "rows": 6,
        # b's row 4 twice: overlapping ranges, which the check reports as a duplicate
        "covers": {"a": [[1, 3], [7, 7]], "b": [[4, 4], [4, 4]]},
    }
    assert check_exactly_once([part_entry("p", table)], {"a": 8, "b": 5}) == [
        "a: row 0 missing",
        "a: rows 4-6 missing",
        "b: rows 0-3 missing",
        "b: row 4 committed 2 times",
    ]


def test_check_exactly_once_problems():
    def part(covers):
        return {"file": "parts/part-00000.parquet", "rows": 0, "covers": covers}

    assert check_exactly_once([part({"a": [[0, 4]]}), part({"a": [[5, 9]]})], {"a": 10}) == []
    assert check_exactly_once([], {"a": 0}) == []
    assert check_exactly_once([part({"a": [[0, 2], [2, 3]]})], {"a": 4}) == ["a: row 2 committed 2 times"]
    assert check_exactly_once([part({"a": [[0, 11]]})], {"a": 10}) == [
        "a: rows 10-11 committed, but the plan has rows 0-9 only"
    ]
    assert check_exactly_once([part({"x": [[0, 1]]})], {}) == [
        "x: 2 row(s) committed from a file that is not in the plan"
    ]
    assert check_exactly_once([], {"a": 3}) == ["a: rows 0-2 missing"]
    assert check_exactly_once([part({"a": [[0, 9]]}), part({"a": [[3, 3], [3, 5]]})], {"a": 12}) == [
        "a: row 3 committed 3 times",
        "a: rows 4-5 committed 2 times",
        "a: rows 10-11 missing",
    ]


def test_check_exactly_once_names_parts_without_usable_ranges():
    parts = [
        {"file": "parts/part-00000.parquet", "rows": 1},
        {"file": "parts/part-00001.parquet", "rows": 1, "covers": {"a": [[2, 1]], "b": "0-1"}},
        {"file": "parts/part-00002.parquet", "rows": 1, "covers": {"a": [[0, 0]]}},
    ]
    assert check_exactly_once(parts, {"a": 1}) == [
        "parts/part-00000.parquet: no row ranges recorded",
        "parts/part-00001.parquet: malformed row ranges for a",
        "parts/part-00001.parquet: malformed row ranges for b",
    ]


def test_check_exactly_once_scales_with_ranges_not_rows():
    n = 10**8
    parts = [
        {"file": f"parts/part-{i:05d}.parquet", "rows": n // 1000, "covers": {"big": [[i * n // 1000, (i + 1) * n // 1000 - 1]]}}
        for i in range(1000)
    ]
    start = time.perf_counter()
    assert check_exactly_once(parts, {"big": n}) == []
    assert check_exactly_once(parts[:-1], {"big": n}) == [f"big: rows {n - n // 1000}-{n - 1} missing"]
    assert time.perf_counter() - start < 5
