"""Training data: rows from Parquet/JSONL files or a `datasets` name -> chat conversations.

    rows -> conversations ([{role, content}]; from a messages column, or prompt + response, or
    messages + an appended response: the generation job's output trains directly)

Pure: no torch; pyarrow and `datasets` are imported when a file or dataset is read. The demo
training set (`write_sample_dataset`) is written here too:

    python -m pipeline.train.data [--out data/train_sample.parquet] [--rows 48]
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.errors import UserError
from pipeline.train.settings import DataSettings

ROLES = ("system", "user", "assistant", "tool", "ipython")
SAMPLE_ANSWER = "Bonjour from the adapter!"


class DataError(UserError):
    """The training data cannot be read or yields no usable conversation."""


def read_rows(paths: Sequence[str], columns: Sequence[str], split: str = "train", config_name: str | None = None) -> list[dict]:
    """Rows (only `columns`, those present) from local Parquet/JSONL files or a `datasets` name."""
    rows: list[dict] = []
    for path in paths:
        files = _local_files(path)
        if files is None:
            rows.extend(_datasets_rows(path, columns, split, config_name))
            continue
        if not files:
            raise DataError(f"data.path: {path!r} matches no .parquet/.jsonl/.json file")
        for f in files:
            rows.extend(_file_rows(f, columns))
    return rows


def _local_files(path: str) -> list[str] | None:
    if glob.has_magic(path):
        return sorted(f for f in glob.glob(path, recursive=True) if _is_data_file(f))
    p = Path(path)
    if p.is_dir():
        # Not *.json in folders: a generation output folder keeps job.json and manifest.json
        # beside its Parquet parts (parts/part-*.parquet).
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in (".parquet", ".jsonl") and not _hidden(f, p))
    if p.is_file():
        return [path]
    return None


def _is_data_file(f: str) -> bool:
    return f.endswith((".parquet", ".jsonl", ".json"))


def _hidden(f: Path, root: Path) -> bool:
    # Dot/underscore names are other tools' bookkeeping (.hydra-run, _SUCCESS, ...).
    return any(part.startswith((".", "_")) for part in f.relative_to(root).parts)


def _file_rows(path: str, columns: Sequence[str]) -> list[dict]:
    if not path.endswith((".jsonl", ".json")):
        import pyarrow.parquet as pq

        present = pq.ParquetFile(path).schema_arrow.names
        return pq.read_table(path, columns=[c for c in columns if c in present]).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.load(f)
    return [{c: r[c] for c in columns if c in r} for r in records]


def _datasets_rows(name: str, columns: Sequence[str], split: str, config_name: str | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # the library raises many types; the message is what helps
        raise DataError(f"data.path: {name!r} is not a local file/folder/glob and `datasets` could not load it: {exc}") from exc
    keep = [c for c in columns if c in ds.column_names]
    return ds.select_columns(keep).to_list()


def normalize_messages(value: Any) -> list[dict]:
    """A conversation as [{"role", "content"}], from a nested column or a JSON string.

    Errors name the problem without the value, so that skipped rows count under a few reasons.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("messages is not valid JSON") from None
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise ValueError("a message is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"a message's role is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError("a message's content is not a string")
        out.append({"role": role, "content": content})
    return out


def conversations_from_rows(rows: Iterable[dict], data: DataSettings) -> tuple[list[list[dict]], Counter]:
    """Build each row's conversation; count the rows skipped and why.

    A row's conversation is its `messages_column` value, or, where that is null or absent,
    [user: `prompt_column`]; then [assistant: the response column] is appended when one is
    configured. So the generation job's output (which may mix prompt and messages rows) trains
    directly: its `response` column after the request it answered.
    """
    convs, skipped = [], Counter()
    messages_col, prompt_col = data.messages_column, data.prompt_column
    response_col = data.append_response_column or data.response_column
    error_col = data.error_column
    for row in rows:
        if error_col and row.get(error_col):
            skipped["row has an error"] += 1
            continue
        try:
            if messages_col and row.get(messages_col) is not None:
                msgs = normalize_messages(row[messages_col])
            elif prompt_col and isinstance(row.get(prompt_col), str) and row[prompt_col].strip():
                msgs = [{"role": "user", "content": row[prompt_col]}]
            else:
                raise ValueError(f"no {' or '.join(c for c in (messages_col, prompt_col) if c)}")
            if response_col:
                response = row.get(response_col)
                if not isinstance(response, str) or not response.strip():
                    raise ValueError(f"no {response_col}")
                msgs = msgs + [{"role": "assistant", "content": response}]
            if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
                raise ValueError("no assistant message to learn from")
        except ValueError as exc:
            skipped[str(exc)[:80]] += 1
            continue
        convs.append(msgs)
    return convs, skipped


def data_columns(data: DataSettings) -> list[str]:
    """The columns the `data` settings read (the others are never loaded)."""
    names = (data.messages_column, data.prompt_column, data.response_column, data.append_response_column,
             data.error_column)
    return [name for name in names if name]


def data_fingerprint(conversations: Sequence[list[dict]]) -> str:
    """sha256 of the conversations in order, as trained on: independent of file layout or
    whether messages came as nested values or JSON text."""
    h = hashlib.sha256()
    for conv in conversations:
        h.update(json.dumps(conv, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and the validation conversations: a seeded draw of
    `round(n * fraction)` (at least one, and never all, when `fraction` > 0), each list sorted."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---- the demo training set ------------------------------------------------------------------

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
        prog="python -m pipeline.train.data",
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
