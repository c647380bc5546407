"""Answers: the model's generated text turned into Workers AI's `{response, tool_calls}`, and
tool calls stored in and read back from Parquet.

- `parse_tool_calls` reads Llama 3.1's custom-tool answers (`{"name": ..., "parameters": {...}}`,
  several of them, a list, fenced, after `<|python_tag|>`) out of the generated text, and says
  what it found in `ParsedAnswer.status` (the `tool_parse` column).
- `encode_tool_calls` / `read_tool_calls` / `load_outputs` store calls in Parquet with their
  arguments as JSON text, and give them back as objects.

Pure module: stdlib + jsonschema at most (this one needs only the stdlib; pyarrow is imported
by `load_outputs` only), so the engine, the tests and readers of an output can all use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.tool_definitions import _short

__all__ = [
    "ParsedAnswer",
    "encode_tool_calls",
    "load_outputs",
    "parse_tool_calls",
    "read_tool_calls",
]

# Special tokens that frame a tool call. They only reach the text when the engine keeps special
# tokens, but the parser must not depend on that setting.
PYTHON_TAG = "<|python_tag|>"
_END_TOKENS = ("<|eom_id|>", "<|eot_id|>")
_FENCE = "```"

STATUS_NONE = "none"
STATUS_PARSED = "parsed"
STATUS_UNKNOWN_TOOL = "unknown_tool"
STATUS_MALFORMED = "malformed"


# --------------------------------------------------------------------------------------------
# Tool calls in the generated text


@dataclass(frozen=True)
class ParsedAnswer:
    """The model's answer split into Workers AI's `response` and `tool_calls`.

    status: "none" (a plain answer), "parsed" (calls extracted; `response` holds only the prose
    around them), "unknown_tool" (a call names a tool that was not offered) or "malformed" (a
    call was started but is not valid JSON). For every status but "parsed", `response` is the
    text exactly as generated and `tool_calls` is empty.
    """

    response: str
    tool_calls: list[dict]
    status: str


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON: arguments holding them could not be stored as JSON text
    # that other readers accept.
    raise ValueError(f"{name} is not valid JSON")


# strict=False: a raw control character inside a string (which small or sampled models emit, and
# which guided decoding grammars let through) should not turn an otherwise whole call into
# "malformed"; the stored arguments are re-encoded as standard JSON anyway.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, strict=False)
_DECODE_ERRORS = (ValueError, RecursionError)  # RecursionError: absurdly deep nesting


def parse_tool_calls(text: str, offered_names: Collection[str]) -> ParsedAnswer:
    """Extract Llama 3.1 custom-tool calls from `text`. Never raises.

    A call is a JSON object `{"name": ..., "parameters": {...}}` (`"arguments"` is accepted too,
    and may hold the object as JSON text), or an OpenAI-style `{"type": "function", "function":
    {...}}`. Calls may follow `<|python_tag|>`, sit in a ```json fence, come several in a row
    (separated by `;`, `,` or newlines) or as one JSON list, and have prose around them.
    JSON that is not a call (the answer to a JSON question, say) stays in the response.
    """
    if text is None:
        text = ""
    elif not isinstance(text, str):
        text = str(text)
    if isinstance(offered_names, str):  # one name, not a collection of characters
        offered_names = (offered_names,)
    offered = frozenset(n for n in (offered_names or ()) if isinstance(n, str))
    if not offered:
        return ParsedAnswer(text, [], STATUS_NONE)

    spans: list[tuple[int, int, list[tuple[str, dict | None]]]] = []
    broken_call = False
    i = _next_candidate(text, 0)
    while i >= 0:
        try:
            value, end = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError) as exc:
            if _starts_like_call(text, i):
                broken_call = True
                break  # the answer is malformed whatever follows
            if isinstance(exc, RecursionError):
                # Nesting no call has; rescanning inside it would cost quadratic time for nothing.
                break
            i = _next_candidate(text, i + 1)
            continue
        calls = _calls_in(value, offered)
        if calls is not None:
            spans.append((i, end, calls))
            if any(status == STATUS_MALFORMED for status, _ in calls):
                break
        # Resume after the whole value, so objects nested in non-call JSON are not read as calls.
        i = _next_candidate(text, end)

    statuses = {status for _, _, calls in spans for status, _ in calls}
    tagged = text.lstrip().startswith(PYTHON_TAG)
    if broken_call or STATUS_MALFORMED in statuses or (tagged and not spans):
        return ParsedAnswer(text, [], STATUS_MALFORMED)
    if STATUS_UNKNOWN_TOOL in statuses:
        return ParsedAnswer(text, [], STATUS_UNKNOWN_TOOL)
    if not spans:
        return ParsedAnswer(text, [], STATUS_NONE)
    tool_calls = [call for _, _, calls in spans for _, call in calls]
    return ParsedAnswer(_remaining_prose(text, spans), tool_calls, STATUS_PARSED)


def _next_candidate(text: str, start: int) -> int:
    """Index of the next `{"`, `{'` or `[{` (whitespace allowed inside) at or after `start`, else -1.

    Only these can open a call, a list of calls, or a call quoted Python-style (which is reported
    as malformed); skipping every other bracket keeps the scan fast on text full of braces.
    """
    n = len(text)
    while True:
        brace, bracket = text.find("{", start), text.find("[", start)
        if brace < 0 and bracket < 0:
            return -1
        i = bracket if brace < 0 or (0 <= bracket < brace) else brace
        j = i + 1
        while j < n and text[j] in " \t\r\n":
            j += 1
        if j < n and text[j] in ("\"'" if text[i] == "{" else "{"):
            return i
        start = i + 1


def _starts_like_call(text: str, i: int) -> bool:
    """Whether the (undecodable) JSON at `i` opens with a `"name"` key, as a call or a list of
    calls does."""
    j = i + 1
    while j < len(text) and text[j] in " \t\r\n":
        j += 1
    if text[i] == "[" and text.startswith("{", j):
        return _starts_like_call(text, j)
    return text.startswith(('"name"', "'name'"), j)


def _calls_in(value: Any, offered: frozenset[str]) -> list[tuple[str, dict | None]] | None:
    """The calls a decoded JSON value holds, as (status, call) pairs; None if it holds none."""
    if isinstance(value, list):
        if not value:
            return None
        items = [_call_from(item, offered) for item in value]
        if all(item is None for item in items):
            return None
        # A list mixing calls and other values is a broken list of calls.
        return [item if item is not None else (STATUS_MALFORMED, None) for item in items]
    item = _call_from(value, offered)
    return None if item is None else [item]


def _call_from(obj: Any, offered: frozenset[str]) -> tuple[str, dict | None] | None:
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict) and set(obj) <= {"type", "function", "id"}:
        obj = obj["function"]
    if not isinstance(obj, dict) or "name" not in obj:
        return None
    name = obj["name"]
    if "parameters" in obj:  # Meta's documented key wins when a model writes both
        arguments = obj["parameters"]
    elif "arguments" in obj:
        arguments = obj["arguments"]
    elif isinstance(name, str) and name in offered:
        # `{"name": "get_time"}` is a call without arguments; any other key beside the name
        # means the arguments were written flat, which is a broken call, not data.
        if len(obj) > 1:
            return (STATUS_MALFORMED, None)
        arguments = {}
    else:
        # A JSON answer that merely has a "name" field, e.g. {"name": "Ada", "born": 1815}.
        return None
    if not isinstance(name, str) or not name.strip():
        return (STATUS_MALFORMED, None)
    if name not in offered:
        return (STATUS_UNKNOWN_TOOL, None)
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = _DECODER.decode(arguments)
        except _DECODE_ERRORS:
            return (STATUS_MALFORMED, None)
    if not isinstance(arguments, dict):
        return (STATUS_MALFORMED, None)
    return (STATUS_PARSED, {"name": name, "arguments": arguments})


def _remaining_prose(text: str, spans: list[tuple[int, int, Any]]) -> str:
    """The text outside the calls, without the tokens, fences and separators that framed them."""
    pieces = []
    previous_end = 0
    for start, end, _ in spans:
        pieces.append(text[previous_end:start])
        previous_end = end
    pieces.append(text[previous_end:])

    kept = []
    fence_open = False
    last = len(pieces) - 1
    for k, piece in enumerate(pieces):
        piece = piece.replace(PYTHON_TAG, "")
        for token in _END_TOKENS:
            piece = piece.replace(token, "")
        if k > 0:  # follows a call
            piece = piece.lstrip(" \t\r\n;,")
            if fence_open and piece.startswith(_FENCE):
                piece = piece[len(_FENCE):].lstrip(" \t\r\n;,")
                fence_open = False
        if k < last:  # precedes a call
            piece = piece.rstrip(" \t\r\n;,")
            # An odd number of fences means the last one opens the block the call sits in.
            opener = piece.rfind(_FENCE)
            if piece.count(_FENCE) % 2 == 1 and (piece[opener + 3:].isalnum() or opener + 3 == len(piece)):
                piece = piece[:opener].rstrip(" \t\r\n;,")
                fence_open = True
        piece = piece.strip()
        if piece:
            kept.append(piece)
    return "\n".join(kept)


# --------------------------------------------------------------------------------------------
# Storage: tool calls in Parquet


def encode_tool_calls(calls: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Calls as Parquet rows of `list<struct<name: string, arguments: string>>`: the arguments
    object as JSON text, keys in the model's order."""
    encoded = []
    for call in calls or ():
        arguments = call.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            raise TypeError(f"tool call arguments must be an object (got {type(arguments).__name__})")
        text = json.dumps(arguments, ensure_ascii=False, sort_keys=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate escaped in the model's JSON ("\\ud800") cannot be written as
            # UTF-8; the ASCII form keeps it as the same escape, still valid JSON.
            text = json.dumps(arguments, ensure_ascii=True, sort_keys=False)
        encoded.append({"name": str(call["name"]), "arguments": text})
    return encoded


def read_tool_calls(value: Any) -> list[dict]:
    """A stored `tool_calls` cell back as `[{"name": str, "arguments": dict}]`.

    Accepts what Parquet readers hand back (a list of `{name, arguments}` structs, a pyarrow
    scalar, a NumPy array from pandas), the whole list as JSON text, and null (no calls).
    Raises ValueError when an `arguments` text is not a JSON object.
    """
    if value is None:
        return []
    if hasattr(value, "as_py"):
        value = value.as_py()
        if value is None:
            return []
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool_calls: not valid JSON text ({exc.msg} at character {exc.pos})") from None
        if value is None:
            return []
    if isinstance(value, Mapping):
        raise ValueError("tool_calls: expected a list of {name, arguments} (got a single object)")
    calls = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "name" not in item:
            raise ValueError(f"tool_calls[{i}]: expected an object with name and arguments (got {_short(item)})")
        arguments = item.get("arguments")
        if arguments is None:
            arguments = {}
        elif isinstance(arguments, (str, bytes, bytearray)):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"tool_calls[{i}].arguments: not valid JSON text ({exc.msg} at character {exc.pos})"
                ) from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"tool_calls[{i}].arguments: expected a JSON object (got {_short(arguments)})")
        calls.append({"name": item["name"], "arguments": dict(arguments)})
    return calls


def load_outputs(path: str | os.PathLike) -> list[dict]:
    """Read a generation job's output (its output folder, a folder of `*.parquet` parts read in
    name order, or one Parquet file; local or a URI on any store) as a list of row dicts, with
    `tool_calls` decoded to `[{name, arguments: dict}]`."""
    import pyarrow.parquet as pq

    from pipeline import storage

    location = storage.resolve(os.fspath(path), "path")
    if location.join("parts").is_dir():
        location = location.join("parts")
    if location.is_dir():
        files = [f for f in location.children() if f.name.endswith(".parquet") and f.is_file()]
        if not files:
            raise FileNotFoundError(f"no .parquet files in {location.shown}")
    elif location.is_file():
        files = [location]
    else:
        raise FileNotFoundError(f"no such output file or folder: {location.shown}")
    rows: list[dict] = []
    for file in files:
        for row in pq.read_table(file.path, filesystem=file.filesystem).to_pylist():
            if "tool_calls" in row:
                row["tool_calls"] = read_tool_calls(row["tool_calls"])
            rows.append(row)
    return rows
