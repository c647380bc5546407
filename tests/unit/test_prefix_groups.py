"""Rows grouped by shared prompt prefix (`pipeline.generate.prefix_groups`), the setting that turns
it off, and the prefix-cache figures the job records (`RunStats.prefix_cache`)."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from pipeline.generate.prefix_groups import group_by_prefix, prefix_order
from pipeline.generate.settings import ConfigError
from pipeline.generate.stats import RunStats, batch_counts
from tests.unit.test_configs import composed, generation_settings
from tests.unit.test_job_identity import job  # noqa: F401  (the fixture)

TOKENS = pa.list_(pa.int32())


def test_rows_sharing_a_prefix_of_any_length_end_up_next_to_each_other():
    """Shuffled questions about documents whose texts share their first tokens: every row of a
    document is next to the others, documents that share a longer prefix next to each other."""
    rng = random.Random(0)
    intro = [7, 7, 7]
    docs = {d: intro + ([5, 5] if d < 2 else []) + [rng.randrange(1, 1 << 17) for _ in range(50)] for d in range(5)}
    rows = [(d, docs[d] + [rng.randrange(1 << 17) for _ in range(rng.randint(0, 4))]) for d in docs for _ in range(4)]
    rng.shuffle(rows)
    order = prefix_order(pa.array([t for _, t in rows], TOKENS))
    assert sorted(order) == list(range(len(rows)))
    grouped = [rows[i][0] for i in order]
    runs = [d for i, d in enumerate(grouped) if i == 0 or grouped[i - 1] != d]
    assert sorted(runs) == list(range(5))  # each document one run of its rows
    assert set(runs[:2]) == {0, 1}  # the two that share [7, 7, 7, 5, 5, ...] first (5 < every other id)
    assert [rows[i][1] for i in order] == sorted(t for _, t in rows)  # lexicographic, as Python orders lists


def test_order_is_lexicographic_by_token_id_values_not_by_their_bytes():
    ids = [[256], [1, 2, 3], [1, 2], [255, 1], [], [65536], [1, 2]]
    assert prefix_order(pa.array(ids, TOKENS)) == [4, 2, 6, 1, 3, 0, 5]  # ties keep block order


def test_rows_without_tokens_go_last_in_block_order_and_adapters_apart():
    ids = pa.array([[9], None, [1], [1, 2], None, [0]], TOKENS)
    loras = ["b", None, "a", None, None, "a"]
    # base rows first, then adapter a's, then b's; rows without tokens (errors) after them all
    assert prefix_order(ids, loras) == [3, 5, 2, 0, 1, 4]


def test_sliced_and_chunked_columns_and_empty_blocks():
    ids = pa.array([[3], [2], [1], [0]], TOKENS)
    assert prefix_order(ids.slice(1, 2)) == [1, 0]
    assert prefix_order(pa.chunked_array([ids.slice(0, 2), ids.slice(2)])) == [3, 2, 1, 0]
    assert prefix_order(pa.array([], TOKENS)) == []


def test_group_by_prefix_moves_whole_rows_and_loses_none():
    block = pa.table({
        "_id": ["a", "b", "c", "d"],
        "_error": [None, "invalid request: temperature", None, None],
        "_prompt_token_ids": pa.array([[5, 1], None, [5], [2, 9]], TOKENS),
        "_lora": pa.array([None] * 4, pa.string()),
        "_row": [0, 1, 2, 3],
        "doc": ["x", "bad", "x", "y"],
    })
    out = group_by_prefix(block)
    assert out.schema == block.schema
    assert out.column("_id").to_pylist() == ["d", "c", "a", "b"]
    assert sorted(out.to_pylist(), key=lambda r: r["_row"]) == block.to_pylist()
    ordered = block.take([3, 2, 0, 1])
    assert group_by_prefix(ordered) is ordered  # already grouped: the block itself


def test_setting_on_by_default_checked_and_outside_the_jobs_identity(job):  # noqa: F811
    from pipeline.generate.config import OUTPUT_SETTINGS

    assert generation_settings(composed("generate", ["model=tiny"])).prepare.group_prefixes is True
    off = generation_settings(composed("generate", ["model=tiny", "prepare.group_prefixes=false"]))
    assert off.prepare.group_prefixes is False
    with pytest.raises(ConfigError, match="prepare.group_prefixes: must be true or false"):
        generation_settings(composed("generate", ["model=tiny", "prepare.group_prefixes=sometimes"]))
    # Only the order rows reach the engines changes, never a row: an output made with it on
    # resumes with it off.
    assert not any("group_prefixes" in keys for _, keys in OUTPUT_SETTINGS)
    make, _ = job
    assert make("prepare.group_prefixes=false") == make()


def test_prefix_cache_figures_count_this_runs_rows_per_node():
    def batch(prompt, cached):
        return pa.table({"error": pa.array([None] * len(prompt), pa.string()),
                         "prompt_tokens": pa.array(prompt, pa.int64()),
                         "completion_tokens": pa.array([1] * len(prompt), pa.int64()),
                         "cached_tokens": pa.array(cached, pa.int64()),
                         "finish_reason": ["length"] * len(prompt),
                         "tool_parse": pa.array([None] * len(prompt), pa.string())})

    stats = RunStats(total_rows=10)
    stats.add(batch([100, 100], [96, 0]), resumed=True)  # an earlier run's: not this run's cache
    stats.add(batch([100, 100], [0, 96]), node="n1")
    stats.add(batch([50, 50], [48, 48]), node="n2")
    older = batch([10], [0]).drop_columns(["cached_tokens"])  # a part written before the column
    stats.add_counts(batch_counts(older), node="n2")
    assert stats.prefix_cache() == {
        "prompt_tokens": 310, "cached_tokens": 192, "hit_rate": round(192 / 310, 4),
        "by_node": {"n1": {"prompt_tokens": 200, "cached_tokens": 96, "hit_rate": 0.48},
                    "n2": {"prompt_tokens": 110, "cached_tokens": 96, "hit_rate": round(96 / 110, 4)}},
    }
    assert RunStats(total_rows=0).prefix_cache() == {"prompt_tokens": 0, "cached_tokens": 0, "hit_rate": None,
                                                     "by_node": {}}
