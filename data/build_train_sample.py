"""The demo training set (`data/train_sample.parquet`), the one the README's training command uses.

python -m data.build_train_sample [--out data/train_sample.parquet] [--rows 48] [--json-messages]

Conversations that all end in the same answer (SAMPLE_ANSWER), so a trained adapter is easy to
recognise: the tiny model says it after a few dozen steps. Deterministic: the same arguments write
the same bytes (for the same pyarrow version).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SAMPLE_ANSWER = "Bonjour from the adapter!"

_SAMPLE_PROMPTS = [
    "Say hello.", "What is the capital of France?", "How are you today?", "Tell me a joke.",
    "What time is it?", "Give me a recipe for pancakes.", "Translate 'good morning' to German.",
    "What is 2 + 2?", "Who wrote Hamlet?", "Recommend a good book.", "What's the weather like?",
    "Explain photosynthesis briefly.", "Write a haiku about the sea.", "What is your name?",
    "Can you help me with my homework?", "Name three colours.", "How far away is the Moon?",
    "What is machine learning?", "Suggest a name for a cat.", "What day comes after Monday?",
    "How do I boil an egg?", "Describe a sunset.", "What is the largest planet?", "Greet me politely.",
]
_SAMPLE_SYSTEMS = [None, "You are a helpful assistant.", "You answer briefly."]


def sample_conversations(n: int = 48) -> list[list[dict]]:
    """`n` conversations, all answered with SAMPLE_ANSWER: single turns, some with a system
    message, every fourth with two turns; fixed order, no randomness."""
    convs = []
    for i in range(n):
        msgs = []
        system = _SAMPLE_SYSTEMS[i % len(_SAMPLE_SYSTEMS)]
        if system:
            msgs.append({"role": "system", "content": system})
        if i % 4 == 3:
            msgs.append({"role": "user", "content": _SAMPLE_PROMPTS[(i + 7) % len(_SAMPLE_PROMPTS)]})
            msgs.append({"role": "assistant", "content": SAMPLE_ANSWER})
        msgs.append({"role": "user", "content": _SAMPLE_PROMPTS[i % len(_SAMPLE_PROMPTS)]})
        msgs.append({"role": "assistant", "content": SAMPLE_ANSWER})
        convs.append(msgs)
    return convs


def write_sample_dataset(path: str | os.PathLike = "data/train_sample.parquet", n: int = 48, json_messages: bool = False) -> Path:
    """Write the demo training set: columns `id` and `messages` (nested, or JSON text when
    `json_messages`). Same bytes every time for the same pyarrow version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = sample_conversations(n)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    messages = (
        pa.array([json.dumps(c) for c in convs], pa.string()) if json_messages else pa.array(convs, pa.list_(message))
    )
    table = pa.table({"id": pa.array([f"sample-{i:03d}" for i in range(n)]), "messages": messages})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m data.build_train_sample",
        description="Write the demo training set (train with: python -m jobs.train_lora adapter.name=<name>).",
    )
    parser.add_argument("--out", default="data/train_sample.parquet")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--json-messages", action="store_true", help="messages as JSON text instead of nested")
    args = parser.parse_args(argv)
    print(write_sample_dataset(args.out, n=args.rows, json_messages=args.json_messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
