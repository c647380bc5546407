"""An engine's batch carries its Ray node in the schema metadata; the driver counts rows per
node and takes the tag off before the rows are committed."""

from __future__ import annotations

import pyarrow as pa

from pipeline.generate.stats import RunStats, tag_node, untag_node


def test_tag_counts_rows_per_node_and_leaves_the_rows_as_they_were():
    table = pa.table({"id": ["a", "b"], "completion_tokens": [1, 2], "prompt_tokens": [3, 4],
                      "error": pa.array([None, None], pa.string()), "tool_parse": pa.array([None, None], pa.string()),
                      "finish_reason": ["stop", "length"]}).replace_schema_metadata({b"other": b"kept"})
    stats = RunStats(total_rows=4)
    for node in ("node-1", "node-2", "node-1"):
        untagged, seen = untag_node(tag_node(table, node))
        assert seen == node and untagged.equals(table) and untagged.schema.metadata == {b"other": b"kept"}
        stats.add(untagged, node=seen)
    assert stats.nodes == {"node-1": 4, "node-2": 2}
    assert untag_node(table) == (table, None)
