"""The plain-data samples the recipes run on: `data/reviews.parquet` (a `text` column to label,
recipe=label) and `data/topics.parquet` (a `topic` column to write examples about, recipe=synthesize).

python -m data.build_plain_samples [--out data/]

Plain columns, no requests: the recipes' templates turn each row into one. Deterministic.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OPENINGS = ["The battery", "Delivery", "The screen", "Customer support", "The price", "Setup", "The manual", "Sound quality"]
VERDICTS = [
    "was excellent, I would buy it again.", "broke after two days.", "was fine, nothing special.",
    "exceeded what I hoped for.", "was slow and frustrating.", "is okay for the money.",
]
TOPICS = [
    "sourdough baking", "Parquet files", "bicycle maintenance", "the water cycle", "learning Spanish",
    "houseplants", "SQL joins", "budget travel", "first aid", "chess openings", "solar panels", "LoRA adapters",
]


def reviews(n: int = 48) -> pa.Table:
    texts = [f"{o} {v}" for o, v in itertools.islice(itertools.product(OPENINGS, VERDICTS), n)]
    return pa.table({"review_id": [f"r{i:03d}" for i in range(len(texts))], "text": texts})


def topics() -> pa.Table:
    return pa.table({"topic": TOPICS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data")
    args = parser.parse_args()
    out = Path(args.out)
    pq.write_table(reviews(), out / "reviews.parquet")
    pq.write_table(topics(), out / "topics.parquet")
    print(f"wrote {out / 'reviews.parquet'} and {out / 'topics.parquet'}")


if __name__ == "__main__":
    main()
