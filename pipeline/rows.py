"""Row flow around the engine, on Arrow tables: input shard -> canonical rows -> engine-ready rows,
and the output table's schema.

canonical:  `_id, _source, _row, _request` (the request fields as JSON text) + passthrough columns.
            Every file, whatever its column types (nested or JSON text), gives this one schema,
            so blocks from different files can be batched together.
prepared:   `_id, _error` + `_prompt_token_ids, _params, _lora, _tools` for rows that can run.
output:     `OUTPUT_SCHEMA` + passthrough columns.

Pure module: pyarrow, jsonschema, jinja2; the tokenizer is passed in as a function.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa

from pipeline.planning import Shard, derived_row_id
from pipeline.prompts import ChatTemplate
from pipeline.sampling import row_seed, sampling_kwargs
from pipeline.schema import REQUEST_FIELDS, Request, RequestError, parse_request

TOOL_CALL_TYPE = pa.struct([("name", pa.string()), ("arguments", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("response", pa.string()),
        ("tool_calls", pa.list_(TOOL_CALL_TYPE)),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("seed", pa.int64()),
        ("lora", pa.string()),
        ("tool_parse", pa.string()),
        # Where the row came from: the input file (relative to the inputs' common folder) and the
        # row's index in it. Resuming an interrupted job reads these back from committed parts.
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
)
CANONICAL = ("_id", "_source", "_row", "_request", "_read_error")
PREPARED = ("_id", "_error", "_prompt_token_ids", "_params", "_lora", "_tools", "_seed")


def canonical_block(
    table: pa.Table,
    shard: Shard,
    id_column: str | None,
    passthrough: Sequence[str],
    passthrough_types: dict | None = None,
    skip: frozenset[int] = frozenset(),
) -> pa.Table:
    """A shard's rows with their ids and their request fields folded into one JSON column.

    `skip` holds the file row indices already committed by an earlier run of the job.
    """
    rows = list(range(shard.first_row, shard.first_row + table.num_rows))
    if skip:
        keep = [i for i, r in enumerate(rows) if r not in skip]
        table = table.take(pa.array(keep, pa.int64()))
        rows = [rows[i] for i in keep]
    n = table.num_rows
    if id_column:
        ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
        ids = [i if i is not None else derived_row_id(shard.source, r) for i, r in zip(ids, rows)]
    else:
        ids = [derived_row_id(shard.source, r) for r in rows]
    present = [f for f in REQUEST_FIELDS if f in table.column_names]
    columns = {f: table.column(f).to_pylist() for f in present}
    requests = []
    for i in range(n):
        fields = {f: _jsonable(columns[f][i]) for f in present if columns[f][i] is not None}
        requests.append(json.dumps(fields, ensure_ascii=False, allow_nan=True))
    out = {
        "_id": pa.array(ids, pa.string()),
        "_source": pa.array([shard.source] * n, pa.string()),
        "_row": pa.array(rows, pa.int64()),
        "_request": pa.array(requests, pa.string()),
        "_read_error": pa.nulls(n, pa.string()),
    }
    types = passthrough_types or {}
    for name in passthrough:
        out[name] = table.column(name) if name in table.column_names else pa.nulls(n, types.get(name, pa.null()))
    return pa.table(out)


def unreadable_block(
    shard: Shard, error: str, passthrough: Sequence[str], passthrough_types: dict, skip: frozenset[int] = frozenset()
) -> pa.Table:
    """A shard whose data cannot be read still gives one (error) row per input row, never none."""
    rows = [r for r in range(shard.first_row, shard.first_row + shard.num_rows) if r not in skip]
    n = len(rows)
    out = {
        "_id": pa.array([derived_row_id(shard.source, r) for r in rows], pa.string()),
        "_source": pa.array([shard.source] * n, pa.string()),
        "_row": pa.array(rows, pa.int64()),
        "_request": pa.nulls(n, pa.string()),
        "_read_error": pa.array([error] * n, pa.string()),
    }
    for name in passthrough:
        out[name] = pa.nulls(n, passthrough_types.get(name, pa.null()))
    return pa.table(out)


def _jsonable(value):
    # Binary cells (an image given as bytes) cannot go into JSON text; the request is rejected
    # for holding an image anyway, so only the fact that it was there has to survive.
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class Preparer:
    """Validates, renders and tokenizes canonical rows, off the engine's critical path."""

    template: ChatTemplate
    encode: Callable[[str], list[int]]
    job_seed: int
    max_model_len: int
    date_string: str | None = None
    ignore_eos: bool = False
    resolve_lora: Callable[[str], None] | None = None  # raises ValueError for an unusable adapter
    # The job's response_format (normalised), for rows that give none of their own.
    default_response_format: dict | None = None

    def prepare_block(self, block: pa.Table) -> pa.Table:
        ids = block.column("_id").to_pylist()
        requests = block.column("_request").to_pylist()
        read_errors = block.column("_read_error").to_pylist()
        cols: dict[str, list] = {k: [] for k in PREPARED}
        for row_id, text, read_error in zip(ids, requests, read_errors):
            if read_error is not None:
                result = {"_id": row_id, "_error": f"unreadable input: {read_error}"}
            else:
                result = self.prepare_row(row_id, text)
            for k in PREPARED:
                cols[k].append(result.get(k))
        out = {
            "_id": pa.array(cols["_id"], pa.string()),
            "_error": pa.array(cols["_error"], pa.string()),
            "_prompt_token_ids": pa.array(cols["_prompt_token_ids"], pa.list_(pa.int32())),
            "_params": pa.array(cols["_params"], pa.string()),
            "_lora": pa.array(cols["_lora"], pa.string()),
            "_tools": pa.array(cols["_tools"], pa.list_(pa.string())),
            "_seed": pa.array(cols["_seed"], pa.int64()),
            "_source": block.column("_source"),
            "_row": block.column("_row"),
        }
        for name in block.column_names:
            if name not in CANONICAL:
                out[name] = block.column(name)
        return pa.table(out)

    def prepare_row(self, row_id: str, request_json: str) -> dict:
        try:
            request = parse_request(json.loads(request_json))
        except RequestError as exc:
            return {"_id": row_id, "_error": f"invalid request: {exc}"}
        if request.response_format is None and self.default_response_format is not None:
            request = dataclasses.replace(request, response_format=self.default_response_format)
        seed = request.seed if request.seed is not None else row_seed(self.job_seed, row_id)
        base = {"_id": row_id, "_seed": seed, "_lora": request.lora}
        if request.lora is not None and self.resolve_lora is not None:
            try:
                self.resolve_lora(request.lora)
            except ValueError as exc:
                return {**base, "_error": f"lora: {exc}"}
        try:
            text = self.render(request)
        except Exception as exc:  # a template error is the row's, never the job's
            return {**base, "_error": f"rendering failed: {exc}"}
        token_ids = self.encode(text)
        room = self.max_model_len - len(token_ids)
        if room < 1:
            return {
                **base,
                "_error": (
                    f"prompt: {len(token_ids)} tokens leave no room to generate within the model's context of "
                    f"{self.max_model_len} tokens (engine.max_model_len); shorten the prompt"
                ),
            }
        params = sampling_kwargs(request, seed, ignore_eos=self.ignore_eos)
        # Generation stops at the end of the context anyway; saying so up front keeps vLLM from
        # rejecting a request whose max_tokens reaches past it.
        params["max_tokens"] = min(params["max_tokens"], room)
        return {
            **base,
            "_prompt_token_ids": token_ids,
            "_params": json.dumps(params),
            "_tools": list(request.tool_names),
        }

    def render(self, request: Request) -> str:
        if request.mode == "prompt" and request.raw:
            return request.prompt
        return self.template.render(
            request.conversation(),
            tools=[dict(t) for t in request.tools] or None,
            date_string=self.date_string,
            add_generation_prompt=True,
        )


def output_table(columns: dict, passthrough_cols: dict[str, pa.ChunkedArray | pa.Array]) -> pa.Table:
    """The output rows as a table in `OUTPUT_SCHEMA` order, with passthrough columns after."""
    n = len(columns["id"])
    arrays = []
    for f in OUTPUT_SCHEMA:
        values = columns.get(f.name, [None] * n)
        arrays.append(pa.array(values, f.type))
    table = pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)
    for name, col in passthrough_cols.items():
        table = table.append_column(name, col)
    return table
