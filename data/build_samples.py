"""The sample request dataset the demo runs on (`data/sample_requests.parquet`).

python -m data.build_samples [--out data/sample_requests.parquet] [--rows 200]

Rows in both modes of the Workers AI schema, with a spread of sampling settings and a few
deliberately broken rows, so a first run shows results and per-row errors side by side.
Deterministic: the same arguments write the same rows.
"""

from __future__ import annotations

import argparse
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = [
    "the origin of the phrase Hello, World", "why the sky is blue", "how a bicycle stays upright",
    "what a hash table is", "the water cycle", "how vaccines train the immune system",
    "what makes sourdough rise", "the difference between weather and climate",
    "how Parquet stores nested data", "what a LoRA adapter changes in a model",
]
SYSTEMS = ["You are a friendly assistant", "You answer in one short sentence.", "You are a careful labeller."]


def sample_rows(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        row: dict = {"prompt": None, "messages": None}
        if i % 2 == 0:
            row["prompt"] = f"Explain {topic}."
        else:
            row["messages"] = [
                {"role": "system", "content": rng.choice(SYSTEMS)},
                {"role": "user", "content": f"Tell me about {topic}."},
            ]
        row["max_tokens"] = rng.choice([16, 32, 64])
        row["temperature"] = rng.choice([0.0, 0.6, 1.0])
        row["top_p"] = rng.choice([None, 0.9, 1.0])
        row["top_k"] = rng.choice([None, 40])
        row["seed"] = rng.choice([None, None, rng.randint(1, 9_999_999_999)])
        rows.append(row)
    # A few rows that break the schema: they come back as error rows, the job goes on.
    rows[5].update(temperature=7.5)                    # above the schema's maximum of 5
    rows[11].update(prompt="Both?", messages=None)      # prompt and messages together
    rows[11]["messages"] = [{"role": "user", "content": "Both?"}]
    rows[18].update(prompt="")                          # shorter than minLength 1
    return rows


def write_samples(path: str, n: int = 200, seed: int = 0) -> None:
    rows = sample_rows(n, seed)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [
            ("prompt", pa.string()), ("messages", pa.list_(message)), ("max_tokens", pa.int64()),
            ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int64()), ("seed", pa.int64()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample_requests.parquet")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_samples(args.out, args.rows, args.seed)
    print(json.dumps({"wrote": args.out, "rows": args.rows}))


if __name__ == "__main__":
    main()
