"""The rows every contender gets, and the order the contenders run in.

Mixed-length chat requests (most short, some medium, a few long, as real traffic), a fixed
`max_tokens` that the job's `engine.ignore_eos=true` makes every row reach, sampled at
temperature 1. No row carries a seed: the job seeds each from its own seed and the row's id, and
the bare engine gets the same seeds through the job's own preparer (`prepared_table`), so every
contender produces the same number of output tokens and (bare vLLM and the job) the same text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Common English words: prompts made of them tokenize like ordinary text with the tiny model's
# BPE (trained on English), so token counts scale with the word counts below.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should america world"
).split()
SYSTEMS = (None, "You are a helpful assistant.", "Answer briefly and precisely, in plain English.")


def make_requests(n: int, max_tokens: int, seed: int, scale: float = 1.0, lora: list[str] | None = None) -> list[dict]:
    """`n` chat requests of mixed length: most short, some medium, a few long (as real traffic).

    `scale` shortens (or lengthens) every prompt; `lora` spreads the rows over these adapters.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.6:
            words = rng.randint(4, 40)
        elif kind < 0.92:
            words = rng.randint(40, 200)
        else:
            words = rng.randint(200, 600)
        words = max(1, int(words * scale))
        messages = []
        system = SYSTEMS[i % len(SYSTEMS)]
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "?"})
        row = {"messages": json.dumps(messages), "max_tokens": max_tokens, "temperature": 1.0, "top_p": 0.95}
        if lora:
            row["lora"] = lora[i % len(lora)]
        rows.append(row)
    return rows


def write_requests(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def prepared_table(path: str, settings, model_path: str):
    """The rows of the Parquet file at `path` as the job hands them to its engines (the prepared
    columns of `pipeline.generate.prepare`: ids, token ids, sampling parameters with the row's
    seed), made by the job's own planning and preparer for `settings` (`GenerationSettings`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.generate.tasks import preparer_for
    from pipeline.generate.planning import plan_shards
    from pipeline.generate.prepare import canonical_block

    plan = plan_shards([path], rows_per_shard=settings.read.rows_per_shard)
    preparer = preparer_for(settings, model_path)
    rows = pq.read_table(path)
    table = pa.concat_tables([
        preparer.prepare_block(canonical_block(rows.slice(s.first_row, s.num_rows), s, None, ()))
        for s in plan.shards
    ])
    errors = [e for e in table.column("_error").to_pylist() if e is not None]
    if errors:
        raise SystemExit(f"{len(errors)} benchmark rows are invalid, e.g. {errors[0]}")
    return table


def rotated(items: list, rep: int) -> list:
    """`items` in the order of repeat `rep` (from 0): each repeat starts one further along, so
    no contender always runs first (on a cold cache) or last (after the others' leftovers)."""
    k = rep % len(items) if items else 0
    return items[k:] + items[:k]
