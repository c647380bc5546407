"""Rows grouped by shared prompt prefix (`prepare.group_prefixes`) through the real job on the
tiny model: the same rows as in input order, every document's questions in one batch (and
part), and the engines' prefix-cache hits in the rows and the manifest."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.workload import WORDS

pytestmark = pytest.mark.integration

DOCUMENTS, QUESTIONS = 6, 4
# Columns that depend on what the engine held in its cache when the row ran, not on the row.
ORDER_DEPENDENT = {"cached_tokens"}


def document_rows() -> list[dict]:
    """Several questions about each of several long documents, shuffled (the synthetic-data
    shape), and two invalid rows."""
    rng = random.Random(0)
    rows = []
    for d in range(DOCUMENTS):
        text = " ".join(rng.choice(WORDS) for _ in range(300))
        for q in range(QUESTIONS):
            messages = [{"role": "system", "content": f"Document {d}: {text}"},
                        {"role": "user", "content": f"Question {q}: what does it say about {rng.choice(WORDS)}?"}]
            rows.append({"doc": d, "messages": json.dumps(messages), "temperature": 1.0, "max_tokens": 4})
    rows += [{"doc": -1, "messages": json.dumps([{"role": "user", "content": "bad"}]), "temperature": 9.0,
              "max_tokens": 4}] * 2
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(document_rows()), path)
    return path


def parts_of(output) -> list[list[dict]]:
    folder = os.path.join(output, "parts")
    return [pq.read_table(os.path.join(folder, name)).to_pylist() for name in sorted(os.listdir(folder))]


def test_grouped_rows_are_the_same_rows_each_document_in_one_batch(generate_job, documents, tmp_path):
    # A KV cache of ~1,500 tokens (2 KiB a token for the tiny model) holds two or three of the
    # six documents (~560 tokens each) at once.
    common = ("passthrough=[doc]", f"batch_size={QUESTIONS}", "n=2", "engine.max_model_len=1024",
              "engine.kv_cache_gib=0.003")
    ledger: list[dict] = []
    on, on_out = generate_job(documents, *common, "output.commit=workers", on_batch=ledger.append,
                              output=str(tmp_path / "on"))
    off_batches: list[list[int]] = []
    off, off_out = generate_job(documents, *common, "output.commit=driver", "prepare.group_prefixes=false",
                                on_batch=lambda t: off_batches.append(t.column("doc").to_pylist()),
                                output=str(tmp_path / "off"))

    grouped = [r for part in parts_of(on_out) for r in part]
    plain = [r for part in parts_of(off_out) for r in part]
    assert len(grouped) == len(plain) == (DOCUMENTS * QUESTIONS + 2) * 2
    by_id = {r["id"]: r for r in plain}
    assert sorted(by_id) == sorted(r["id"] for r in grouped)
    for row in grouped:  # every row, its n answers, seeds and errors alike; only the cache hits differ
        other = by_id[row["id"]]
        assert {k: v for k, v in row.items() if k not in ORDER_DEPENDENT} == \
               {k: v for k, v in other.items() if k not in ORDER_DEPENDENT}, row["id"]
    assert sum(r["error"] is not None for r in grouped) == 4
    assert all(r["error"] is None for r in grouped if r["doc"] >= 0)

    # Grouped: each worker-committed part (one batch of QUESTIONS rows, n answers each) holds one
    # document's questions, the error rows a part of their own; in input order batches mix them.
    assert len(ledger) == DOCUMENTS + 1
    parts = parts_of(on_out)
    assert sorted(len({r["doc"] for r in part}) for part in parts) == [1] * (DOCUMENTS + 1)
    assert sorted((part[0]["doc"], len(part)) for part in parts) == \
           [(-1, 2 * 2)] + [(d, QUESTIONS * 2) for d in range(DOCUMENTS)]
    assert any(len(set(docs)) > 1 for docs in off_batches)

    # The hit rate is the rows' cached tokens over their prompt tokens; grouped, every question
    # after a document's first finds the document in the cache.
    for manifest, rows in ((on, grouped), (off, plain)):
        cache = manifest["prefix_cache"]
        ok = [r for r in rows if r["error"] is None]
        assert cache["prompt_tokens"] == sum(r["prompt_tokens"] for r in ok) == manifest["tokens"]["prompt"]
        assert cache["cached_tokens"] == sum(r["cached_tokens"] for r in ok)
        assert cache["hit_rate"] == round(cache["cached_tokens"] / cache["prompt_tokens"], 4)
        assert sum(n["prompt_tokens"] for n in cache["by_node"].values()) == cache["prompt_tokens"]
    assert on["prefix_cache"]["hit_rate"] > 0.7
    assert on["prefix_cache"]["hit_rate"] > off["prefix_cache"]["hit_rate"], (on["prefix_cache"], off["prefix_cache"])
    # The report's headline figures show it.
    report = open(os.path.join(on_out, "report.html"), encoding="utf-8").read()
    assert f'<div class="k">prefix cache hit rate</div><div class="v">{on["prefix_cache"]["hit_rate"]:.4g}</div>' in report
