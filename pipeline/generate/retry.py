"""`retry=errors`: redo the rows of a finished output that failed for reasons a new try can fix,
and put the new answers in their place.

Which rows (`rows_to_redo`):
- an `engine error:` or `label scoring failed:` (the engine refused or failed the row);
- `tool_parse` = `malformed` (the model began a tool call it did not finish well);
- with `retry_max_tokens=N`, also rows cut off by `max_tokens` (`finish_reason` = `length`) after
  fewer than N tokens, which are redone with a budget of N tokens.
Rows refused before the engine (a broken request, a template that found a null) would fail the
same way again and are left as they are.

A redone row gets a new seed (`retry_seed`: from its seed and the attempt number, so the retry is
reproducible and does not repeat the answer that failed); its id, source and passthrough columns
stay. The new answers replace the old rows in the parts that hold them: each part is rewritten to
a temporary file and renamed over the old one (on an object store, put whole in one request, which
readers see entirely or not at all), so a reader of `<output>/parts` sees every id exactly once at
every moment, before, during and after. The manifest is then rewritten with the
new counts and a `retries` entry naming the rows redone.

Pure module: pyarrow and the output folder's own files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.generate.part_files import tmp_name
from pipeline.generate.samples import with_seeds
from pipeline.sampling import retry_seed

RETRIED_ERRORS = ("engine error:", "label scoring failed:")


class RetryError(UserError):
    """`retry=errors` cannot run on this output folder: the message says why and what to do."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, heading="retry:")


@dataclass
class RedoPlan:
    """The rows to redo, by part: part path -> {id: reason}."""

    by_part: dict[str, dict[str, str]] = field(default_factory=dict)
    # input file -> its row indices to generate again (a row with n answers is generated whole)
    sources: dict[str, list[int]] = field(default_factory=dict)
    # ids whose new answer gets the larger max_tokens (they were cut off)
    truncated: frozenset[str] = frozenset()

    @property
    def ids(self) -> list[str]:
        return sorted(i for rows in self.by_part.values() for i in rows)


def rows_to_redo(part_paths: list[str], max_tokens: int | None) -> RedoPlan:
    """The committed rows `retry=errors` redoes (the rules are in the module's docstring)."""
    plan = RedoPlan()
    sources: dict[str, set[int]] = {}
    truncated = set()
    for path in part_paths:
        columns = ["id", "error", "tool_parse", "finish_reason", "completion_tokens", "source_file", "source_row"]
        table = _read(path, columns)
        for row in table.to_pylist():
            reason = redo_reason(row, max_tokens)
            if reason is None:
                continue
            plan.by_part.setdefault(path, {})[row["id"]] = reason
            sources.setdefault(row["source_file"], set()).add(row["source_row"])
            if reason == "length":
                truncated.add(row["id"])
    plan.sources = {s: sorted(rows) for s, rows in sorted(sources.items())}
    plan.truncated = frozenset(truncated)
    return plan


def redo_reason(row: dict, max_tokens: int | None) -> str | None:
    error = row.get("error")
    if error is not None:
        return "error" if error.startswith(RETRIED_ERRORS) else None
    if row.get("tool_parse") == "malformed":
        return "malformed tool call"
    if max_tokens is not None and row.get("finish_reason") == "length" and (row.get("completion_tokens") or 0) < max_tokens:
        return "length"  # cut off with a smaller budget than the new one
    return None


def reseed_for_retry(batch: pa.Table, attempt: int, truncated: frozenset[str], max_tokens: int | None,
                     max_model_len: int | None = None) -> pa.Table:
    """Prepared rows (after `expand_samples`) as retry `attempt` runs them: each with its retry
    seed, and the rows in `truncated` with `max_tokens` (when it is larger than theirs, and as far
    as the context leaves room)."""
    ids, params = batch.column("_id").to_pylist(), batch.column("_params").to_pylist()
    prompts = batch.column("_prompt_token_ids").to_pylist()
    seeds = [retry_seed(s, attempt) if s is not None else None for s in batch.column("_seed").to_pylist()]
    budgets: list[int | None] = [None] * len(ids)
    if max_tokens is not None:
        for i, row_id in enumerate(ids):
            if row_id in truncated and params[i] is not None:
                own = int(json.loads(params[i])["max_tokens"])
                room = max_model_len - len(prompts[i] or ()) if max_model_len else max_tokens
                budgets[i] = max(own, min(max(own, int(max_tokens)), room))
    return with_seeds(batch, seeds, budgets)


def replace_rows(plan: RedoPlan, new_rows: pa.Table) -> int:
    """Put `new_rows` (the redone answers, by id) in place of the old rows of each part of `plan`;
    return how many rows were replaced. Each part is swapped whole by a rename."""
    wanted = set(plan.ids)
    ids = new_rows.column("id").to_pylist()
    by_id = {row_id: i for i, row_id in enumerate(ids) if row_id in wanted}
    missing = wanted - set(by_id)
    if missing:
        raise RuntimeError(f"retry: {len(missing)} redone row(s) came back without an answer, e.g. {sorted(missing)[:3]}")
    replaced = 0
    for path, rows in plan.by_part.items():
        table = _read(path)
        old_ids = table.column("id").to_pylist()
        take_new = [by_id.get(row_id) if row_id in rows else None for row_id in old_ids]
        positions = [i for i, j in enumerate(take_new) if j is not None]
        fresh = new_rows.take(pa.array([take_new[i] for i in positions], pa.int64())).select(table.column_names)
        fresh = fresh.cast(table.schema)
        mask = pa.array([j is None for j in take_new])
        # Keep the part's row order: old rows where nothing changed, new rows where they were redone.
        order = pc.sort_indices(pa.table({"at": pa.concat_arrays([
            pa.array([i for i, keep in enumerate(mask.to_pylist()) if keep], pa.int64()),
            pa.array(positions, pa.int64()),
        ])}), sort_keys=[("at", "ascending")])
        merged = pa.concat_tables([table.filter(mask), fresh]).take(order)
        replaced += len(positions)
        if storage.is_remote(path):
            buffer = pa.BufferOutputStream()
            pq.write_table(merged, buffer)
            storage.resolve(path).write_bytes(buffer.getvalue().to_pybytes())
            continue
        tmp = tmp_name(path)
        try:
            pq.write_table(merged, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)  # the part's rows are the same ids: readers see old or new, whole
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)
    return replaced


def _read(path: str, columns: list[str] | None = None) -> pa.Table:
    location = storage.resolve(path)
    return pq.read_table(location.path, columns=columns, filesystem=location.filesystem)
