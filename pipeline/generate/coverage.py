"""Which input rows each part holds, and the exactly-once check over all of them.

Every part's manifest entry records, per input file, the inclusive ranges of row indices it
holds (`part_entry`). Before `manifest.json` is written, `OutputDir.finish()`
(`pipeline.generate.sinks`) checks from those ranges that every planned input row was committed
exactly once (`check_exactly_once`); a gap or a duplicate stops the job without a manifest.

Pure module: plain data in, plain data out (pyarrow only to read a part's two source columns).
"""

from __future__ import annotations

import pyarrow as pa


def part_entry(name: str, table: pa.Table) -> dict:
    """A part's manifest entry: its row count and, per input file, the row ranges it covers."""
    by_source: dict[str, list[int]] = {}
    for source, row in zip(table.column("source_file").to_pylist(), table.column("source_row").to_pylist()):
        by_source.setdefault(source, []).append(row)
    return {"file": name, "rows": table.num_rows, "covers": {s: _ranges(rows) for s, rows in sorted(by_source.items())}}


def _ranges(rows: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 3], [7, 7]] (inclusive). A repeated row starts a new range, so a
    part that holds a row twice shows as overlapping ranges."""
    out: list[list[int]] = []
    for r in sorted(rows):
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return out


def check_exactly_once(
    parts: list[dict],
    expected_rows: dict[str, int],
    per_row: int = 1,
    selected: dict[str, list[int]] | None = None,
) -> list[str]:
    """What keeps `parts` (manifest entries, with their inclusive `covers` ranges) from holding
    rows 0..n-1 of each input file exactly `per_row` times (n answers per row), n being
    `expected_rows[file]`; empty if nothing. With `selected` (file -> row indices: the rows a
    `limit` picked), only those rows are expected, and any other row is one too many.

    Works on ranges, not rows: a boundary sweep over the sorted range ends, so a plan of 10^8
    rows in a few thousand ranges costs a few thousand steps."""
    problems: list[str] = []
    ranges: dict[str, list[tuple[int, int]]] = {source: [] for source in expected_rows}
    for part in parts:
        covers = part.get("covers")
        if not isinstance(covers, dict):
            problems.append(f"{part.get('file', '?')}: no row ranges recorded")
            continue
        for source, spans in covers.items():
            ok = isinstance(spans, list) and all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(type(x) is int for x in s) and s[0] <= s[1]
                for s in spans
            )
            if not ok:
                problems.append(f"{part.get('file', '?')}: malformed row ranges for {source}")
                continue
            ranges.setdefault(source, []).extend((a, b) for a, b in spans)
    for source in sorted(ranges):
        spans = ranges[source]
        if source not in expected_rows:
            count = sum(b - a + 1 for a, b in spans)
            problems.append(f"{source}: {count} row(s) committed from a file that is not in the plan")
            continue
        n = expected_rows[source]
        if selected is not None:
            wanted = [tuple(r) for r in _ranges(selected.get(source, []))]
        else:
            wanted = [(0, n - 1)] if n else []
        for start, end, times, expected in _coverage(spans, wanted * per_row, n):
            rows = f"row {start}" if start == end else f"rows {start}-{end}"
            if times == expected:
                continue
            if start < 0 or end >= n:
                problems.append(f"{source}: {rows} committed, but the plan has rows 0-{n - 1} only")
            elif times == 0:
                problems.append(f"{source}: {rows} missing")
            elif expected == 0:
                problems.append(f"{source}: {rows} committed, but not among the rows the plan selected (limit)")
            else:
                problems.append(f"{source}: {rows} committed {times} times"
                                + (f" (expected {expected}: n={per_row})" if per_row > 1 else ""))
    return problems


def _coverage(spans: list[tuple[int, int]], wanted: list[tuple[int, int]], n: int) -> list[tuple[int, int, int, int]]:
    """Split the rows touched by `spans` (what is committed), by `wanted` (what should be, each
    span once per expected copy) and the plan's rows 0..n-1 into maximal inclusive runs
    [(start, end, times committed, times expected)], each run wholly inside the plan or outside."""
    delta: dict[int, list[int]] = {0: [0, 0], n: [0, 0]}
    for which, group in ((0, spans), (1, wanted)):
        for a, b in group:
            delta.setdefault(a, [0, 0])[which] += 1
            delta.setdefault(b + 1, [0, 0])[which] -= 1
    points = sorted(delta)
    runs: list[tuple[int, int, int, int]] = []
    times = expected = 0
    for here, following in zip(points, points[1:]):
        times += delta[here][0]
        expected += delta[here][1]
        inside = 0 <= here < n
        last = runs[-1] if runs else None
        if last and last[2:] == (times, expected) and last[1] == here - 1 and (0 <= last[0] < n) == inside:
            runs[-1] = (last[0], following - 1, times, expected)
        else:
            runs.append((here, following - 1, times, expected))
    return runs
