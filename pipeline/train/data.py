"""Training data: rows from Parquet/JSONL files or a `datasets` name -> chat conversations.

    rows -> conversations ([{role, content}]; from a messages column, or prompt + response, or
    messages + an appended response: the generation job's output trains directly)

Pure: no torch; pyarrow and `datasets` are imported when a file or dataset is read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.errors import UserError
from pipeline.train.settings import DataSettings

ROLES = ("system", "user", "assistant", "tool", "ipython")


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
