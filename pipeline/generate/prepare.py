"""Row flow around the engine, on Arrow tables: input shard -> canonical rows -> engine-ready rows,
and the output table's schema.

canonical:  `_id, _source, _row, _request` (the request fields as JSON text), `_read_error` (why a row
            has no request: its stage named) + passthrough columns.
            Every file, whatever its column types (nested or JSON text), gives this one schema,
            so blocks from different files can be batched together.
prepared:   `_id, _error` + `_prompt_token_ids, _params, _lora, _tools, _seed` for rows that can run,
            and `_choices` (each label's tokens) for rows whose label probabilities are wanted.
output:     `OUTPUT_SCHEMA` + passthrough columns.

Pure module: pyarrow, jsonschema, jinja2; the tokenizer is passed in as a function.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa

from pipeline.generate.planning import Shard, derived_row_id
from pipeline.generate.samples import LABEL_PROBS_TYPE, LOGPROBS_TYPE
from pipeline.prompts import ChatTemplate, LiteralSpecialTokens
from pipeline.row_templates import RowTemplate, TemplateRowError
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
        # Of the prompt tokens, those the engine's prefix cache held already (not prefilled again);
        # depends on what the engine ran before the row, so it can differ between runs.
        ("cached_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("seed", pa.int64()),
        ("sample", pa.int64()),  # which of the row's n answers (0 with n=1)
        ("lora", pa.string()),
        ("tool_parse", pa.string()),
        ("logprobs", LOGPROBS_TYPE),  # with logprobs / top_logprobs
        ("label_probs", LABEL_PROBS_TYPE),  # rows with a choice response_format (label_probs=true)
        # Where the row came from: the input file (relative to the inputs' common folder) and the
        # row's index in it. Resuming an interrupted job reads these back from committed parts.
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
)
CANONICAL = ("_id", "_source", "_row", "_request", "_read_error")
PREPARED = ("_id", "_error", "_prompt_token_ids", "_params", "_lora", "_tools", "_seed", "_choices")
# The extension fields a job sets for rows that give none of their own (conf/generate.yaml).
JOB_DEFAULTS = ("stop", "min_tokens", "logprobs", "top_logprobs")


def job_request_defaults(request_defaults: dict | None, **extensions) -> dict:
    """The request fields a job gives every row that has none of its own: `request_defaults`
    (schema fields: temperature, max_tokens, ...), then the job's extension settings."""
    out = dict(request_defaults or {})
    out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in extensions.items() if v is not None and v is not False})
    return out


def canonical_block(
    table: pa.Table,
    shard: Shard,
    id_column: str | None,
    passthrough: Sequence[str],
    passthrough_types: dict | None = None,
    skip: frozenset[int] = frozenset(),
    template: RowTemplate | None = None,
) -> pa.Table:
    """A shard's rows with their ids and their request fields folded into one JSON column.

    `skip` holds the file row indices already committed by an earlier run of the job. A row
    whose cells cannot be turned into a request (text that is not UTF-8, a map with a repeated
    key, a number JSON cannot hold) gets a `_read_error` of its own; the other rows go on.
    With a `template`, a row's `messages` are written from its columns (`pipeline.row_templates`);
    a row the template fails on gets a `template:` error.
    """
    rows = list(range(shard.first_row, shard.first_row + table.num_rows))
    if skip:
        keep = [i for i, r in enumerate(rows) if r not in skip]
        table = table.take(pa.array(keep, pa.int64()))
        rows = [rows[i] for i in keep]
    n = table.num_rows
    read_errors: list[str | None] = [None] * n
    ids = [derived_row_id(shard.source, r) for r in rows]
    if id_column:
        values, errors = column_cells(table.column(id_column))
        for i, (value, error) in enumerate(zip(values, errors)):
            if error is not None:
                read_errors[i] = f"column '{id_column}': {error}"
            elif value is not None:
                ids[i] = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    present = [f for f in REQUEST_FIELDS if f in table.column_names
               and (template is None or template.request_columns)]
    cells = {f: column_cells(table.column(f)) for f in present}
    template_cells = {c: column_cells(table.column(c)) for c in (template.columns if template else ())}
    requests: list[str | None] = []
    for i in range(n):
        if read_errors[i] is not None:
            requests.append(None)
            read_errors[i] = f"unreadable input: {read_errors[i]}"
            continue
        try:
            fields = {}
            for f in present:
                value, error = cells[f][0][i], cells[f][1][i]
                if error is not None:
                    raise ValueError(f"column '{f}': {error}")
                if value is not None:
                    fields[f] = request_value(f, value)
            if template is not None and not (template.keep_requests and ("prompt" in fields or "messages" in fields)):
                fields.pop("prompt", None)
                fields["messages"] = template.messages(_template_row(template_cells, i))
            requests.append(json.dumps(fields, ensure_ascii=False, allow_nan=True))
        except TemplateRowError as exc:
            requests.append(None)
            read_errors[i] = safe_text(f"template: {exc}")
        except Exception as exc:  # one row's cells, never the shard
            requests.append(None)
            read_errors[i] = safe_text(f"unreadable input: {_describe(exc)}")
    out = {
        "_id": pa.array([safe_text(i) for i in ids], pa.string()),
        "_source": pa.array([shard.source] * n, pa.string()),
        "_row": pa.array(rows, pa.int64()),
        "_request": pa.array(requests, pa.string()),
        "_read_error": pa.array(read_errors, pa.string()),
    }
    types = passthrough_types or {}
    for name in passthrough:
        out[name] = table.column(name) if name in table.column_names else pa.nulls(n, types.get(name, pa.null()))
    return pa.table(out)


def _template_row(template_cells: dict[str, tuple[list, list]], i: int) -> dict:
    """Row `i`'s values of the template's columns, as text, numbers, lists and dicts."""
    row = {}
    for name, (values, errors) in template_cells.items():
        if errors[i] is not None:
            raise ValueError(f"column '{name}': {errors[i]}")
        value = values[i]
        # Text and nested cells as JSON data; other values (numbers, dates) as they are, for Jinja to print.
        row[name] = _jsonable(value) if isinstance(value, (bytes, bytearray, dict, list, tuple)) else value
    return row


def column_cells(column: pa.ChunkedArray | pa.Array) -> tuple[list, list]:
    """A column's cells as Python values, and per cell the reason it could not be read (or None).

    The whole column converts at once unless one cell cannot (invalid UTF-8 in a string column
    raises for the whole column); then each cell is converted on its own, so only that row fails.
    Map cells become dicts.
    """
    try:
        return column.to_pylist(maps_as_pydicts="strict"), [None] * len(column)
    except Exception:
        pass
    values, errors = [], []
    for i in range(len(column)):
        try:
            values.append(column[i].as_py(maps_as_pydicts="strict"))
            errors.append(None)
        except Exception as exc:
            values.append(None)
            errors.append(_describe(exc))
    return values, errors


def request_value(field: str, value):
    """A cell's value as JSON data for the request field `field`."""
    if field == "image":
        # The model reads no images: the request is refused for holding one, so only the fact
        # that it was there has to survive, whatever the cell's type.
        return "<image>"
    return _jsonable(value)


def _jsonable(value):
    # A binary cell is UTF-8 text: un-annotated Parquet BINARY is how Hive, Impala and some Spark
    # settings write strings (planning accepts binary columns only for text fields).
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not valid UTF-8 (byte {exc.object[exc.start]:#04x} at position {exc.start})") from None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return float(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    # Planning refuses request columns of other types (dates, times, durations); a value that
    # still gets here is refused for this row rather than guessed at.
    raise ValueError(f"a value of type {type(value).__name__} is not a JSON value")


def safe_text(text: str) -> str:
    """`text` as valid UTF-8: lone surrogates (from JSON escapes in a row) written as \\udXXX."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.object[exc.start]:#04x} at position {exc.start})"
    if isinstance(exc, (ValueError, RequestError)) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


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
        "_read_error": pa.array([f"unreadable input: {error}"] * n, pa.string()),
    }
    for name in passthrough:
        out[name] = pa.nulls(n, passthrough_types.get(name, pa.null()))
    return pa.table(out)


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
    # The most characters one token of the tokenizer stands for (see max_request_chars).
    max_token_chars: int = 256
    # Special-token text inside content stays text (see prompts.LiteralSpecialTokens): the ids of
    # the special tokens, and an encoder that reads special-token text as plain text. Without
    # them the rendered text is encoded whole with `encode`.
    special_token_ids: dict[str, int] | None = None
    encode_literal: Callable[[str], list[int]] | None = None
    # Request fields for rows that give none of their own: the job's `request_defaults`, `stop`,
    # `min_tokens`, `logprobs`, `top_logprobs` (validated with the row, as if the row held them).
    defaults: dict = dataclasses.field(default_factory=dict)
    # Rows with a `choice` response_format get each label's tokens (`_choices`), which the engine
    # scores: the label's text, then the end of the turn, as the model would answer it.
    label_probs: bool = False
    end_of_turn: str = "<|eot_id|>"

    def __post_init__(self):
        self.literal = (
            LiteralSpecialTokens(list(self.special_token_ids))
            if self.special_token_ids is not None and self.encode_literal is not None
            else None
        )
        self.encode_piece = shared_pieces_once(self.encode_literal) if self.literal is not None else None

    def prepare_block(self, block: pa.Table) -> pa.Table:
        ids = block.column("_id").to_pylist()
        requests = block.column("_request").to_pylist()
        read_errors = block.column("_read_error").to_pylist()
        cols: dict[str, list] = {k: [] for k in PREPARED}
        for row_id, text, read_error in zip(ids, requests, read_errors):
            if read_error is not None:
                result = {"_id": row_id, "_error": read_error}
            else:
                try:
                    result = self.prepare_row(row_id, text)
                except Exception as exc:  # whatever goes wrong with one row is that row's error
                    result = {"_id": row_id, "_error": f"preparing failed: {type(exc).__name__}: {exc}"}
            if result.get("_error") is not None:
                result["_error"] = safe_text(result["_error"])
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
            "_choices": pa.array(cols["_choices"], pa.list_(pa.list_(pa.int32()))),
            "_source": block.column("_source"),
            "_row": block.column("_row"),
        }
        for name in block.column_names:
            if name not in CANONICAL:
                out[name] = block.column(name)
        return pa.table(out)

    def prepare_row(self, row_id: str, request_json: str) -> dict:
        """One row's engine request, or its error named by the stage that failed."""
        limit = self.max_request_chars()
        if len(request_json) > limit:
            return {
                "_id": row_id,
                "_error": (
                    f"invalid request: {len(request_json):,} characters of request fields cannot fit the model's "
                    f"context of {self.max_model_len} tokens (engine.max_model_len); shorten the prompt"
                ),
            }
        try:
            fields = json.loads(request_json)
            if self.defaults:  # the job's values for the fields this row does not give
                fields = {**self.defaults, **{k: v for k, v in fields.items() if v is not None}}
            request = parse_request(fields)
        except RequestError as exc:
            return {"_id": row_id, "_error": f"invalid request: {exc}"}
        except (ValueError, RecursionError) as exc:
            return {"_id": row_id, "_error": f"invalid request: {type(exc).__name__}: {exc}"}
        if request.response_format is None and self.default_response_format is not None:
            request = dataclasses.replace(request, response_format=self.default_response_format)
        if request.min_tokens and request.min_tokens > request.max_tokens:
            return {"_id": row_id, "_error": f"invalid request: min_tokens ({request.min_tokens}) must be <= "
                                             f"max_tokens ({request.max_tokens})"}
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
        try:
            token_ids = self.tokenize(request, text)
        except Exception as exc:
            return {**base, "_error": f"tokenization failed: {type(exc).__name__}: {exc}"}
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
            "_choices": self.choice_tokens(request),
        }

    def choice_tokens(self, request: Request) -> list[list[int]] | None:
        """Each label's tokens as the model would answer with it, or None (no labels to score)."""
        choices = (request.response_format or {}).get("choice")
        if not (self.label_probs and choices):
            return None
        encode = self.encode_literal or self.encode
        end = (self.special_token_ids or {}).get(self.end_of_turn)
        return [encode(c) + ([end] if end is not None else []) for c in choices]

    def max_request_chars(self) -> int:
        """Request JSON longer than this cannot fit the context, whatever the tokenizer: checked
        before any parsing or rendering, so a row of megabytes costs nothing.

        Every token covers at most `max_token_chars` characters of text, and JSON escaping
        (a control character as \\u0000) at most sextuples a character.
        """
        return 6 * self.max_token_chars * self.max_model_len + 65536

    def render(self, request: Request) -> str:
        """The prompt text. A raw prompt is the model's own text, special tokens included; in
        a rendered one, special-token text from the request is marked so that it stays text."""
        if request.mode == "prompt" and request.raw:
            return request.prompt
        messages, tools = request.conversation(), [dict(t) for t in request.tools] or None
        if self.literal is not None:
            messages, tools = self.literal.protect(messages), self.literal.protect(tools)
        return self.template.render(messages, tools=tools, date_string=self.date_string, add_generation_prompt=True)

    def tokenize(self, request: Request, text: str) -> list[int]:
        if self.literal is None or (request.mode == "prompt" and request.raw):
            return self.encode(text)
        ids: list[int] = []
        for piece, special in self.literal.segments(text):
            ids.extend([self.special_token_ids[piece]] if special else self.encode_piece(piece))
        return ids


# A rendered prompt is encoded piece by piece between its special tokens (Preparer.tokenize), each
# piece on its own, so a long piece that many rows share (a labelling instruction, a system
# prompt, a document asked several questions) is encoded once per worker and reused: the same
# tokens, since encoding a piece depends on nothing but the piece. Short pieces cost less to
# encode than to remember. Bounded: at most SHARED_PIECES pieces kept, the least recent dropped.
SHARED_PIECE_CHARS = 512
SHARED_PIECES = 32


def shared_pieces_once(encode: Callable[[str], list[int]]) -> Callable[[str], Sequence[int]]:
    """`encode`, remembering its tokens for the last `SHARED_PIECES` long pieces it encoded."""
    remembered = functools.lru_cache(maxsize=SHARED_PIECES)(lambda piece: tuple(encode(piece)))

    def encode_piece(piece: str) -> Sequence[int]:
        return remembered(piece) if len(piece) >= SHARED_PIECE_CHARS else encode(piece)

    encode_piece.cache_info = remembered.cache_info  # long pieces encoded (misses) and reused (hits)
    return encode_piece


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
