"""Tools in, tool calls out: the request's `tools` / `functions` and `response_format`, and the
model's answer turned into Workers AI's `{response, tool_calls}`.

- `normalize_tools` checks a request's tools against the model's input schema, gathering every
  problem with its path, and returns them in the one shape Meta's Llama 3.1 chat template and
  Hugging Face expect: `{"type": "function", "function": {name, description, parameters}}`.
- `parse_tool_calls` reads Llama 3.1's custom-tool answers (`{"name": ..., "parameters": {...}}`,
  several of them, a list, fenced, after `<|python_tag|>`) out of the generated text.
- `encode_tool_calls` / `read_tool_calls` / `load_outputs` store calls in Parquet with their
  arguments as JSON text, and give them back as objects.
- `validate_response_format` maps a request's `response_format` onto vLLM's structured outputs.

Pure module: stdlib + jsonschema (pyarrow is imported by `load_outputs` only).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema

__all__ = [
    "ParsedAnswer",
    "ResponseFormatError",
    "ToolSpecError",
    "encode_tool_calls",
    "load_outputs",
    "normalize_tools",
    "parse_tool_calls",
    "read_tool_calls",
    "validate_response_format",
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
# Request side: tools and functions


class ToolSpecError(ValueError):
    """Tools or functions that break the input schema. `problems` holds one line per broken rule,
    each starting with the path of the offending value."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


_NO_ARGUMENTS_HINT = 'for a tool without arguments use {"type": "object", "properties": {}}'


def normalize_tools(tools: Any, functions: Any = None) -> list[dict]:
    """Validate a request's `tools` and `functions`; return the tools as
    `[{"type": "function", "function": {"name", "description", "parameters"}}]`.

    `None` stands for an absent field. Raises `ToolSpecError` listing every problem found.
    Each returned tool is a deep copy, so callers may keep it while the request is mutated.
    """
    problems: list[str] = []
    normalized: list[dict] = []
    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            problems.append(f"tools: must be a list of tool objects (got {_short(tools)})")
        else:
            first_seen: dict[str, str] = {}
            for i, item in enumerate(tools):
                path = f"tools[{i}]"
                tool = _check_tool(item, path, problems)
                # Duplicates are looked for among broken tools too, so one pass reports them all.
                named = _tool_name(item, path)
                if named is not None:
                    name, name_path = named
                    if name in first_seen:
                        problems.append(
                            f"{name_path}: duplicate tool name {_short(name)} (also at {first_seen[name]}); "
                            "tool names must be unique, because a call names its tool"
                        )
                        continue
                    first_seen[name] = name_path
                if tool is not None:
                    normalized.append(tool)
    if functions is not None:
        problems.extend(_function_problems(functions))
    if problems:
        raise ToolSpecError(problems)
    return normalized


def _tool_name(item: Any, path: str) -> tuple[str, str] | None:
    """A tool's name and the path it sits at, when it has a usable one."""
    if not isinstance(item, Mapping):
        return None
    if isinstance(item.get("function"), Mapping):
        item, path = item["function"], f"{path}.function"
    name = item.get("name")
    return (name, f"{path}.name") if isinstance(name, str) and name.strip() else None


def _check_tool(item: Any, path: str, problems: list[str]) -> dict | None:
    """One tool in either accepted shape, normalised; None (with problems added) when broken."""
    if not isinstance(item, Mapping):
        problems.append(f"{path}: must be an object (got {_short(item)})")
        return None
    before = len(problems)
    if "function" in item:
        if "name" in item or "parameters" in item:
            top = "name" if "name" in item else "parameters"
            problems.append(
                f'{path}: mixes the two tool shapes (has "function" and a top-level "{top}"); use either '
                '{name, description, parameters} or {type: "function", function: {name, description, parameters}}'
            )
            return None
        if "type" not in item:
            problems.append(f'{path}: missing "type" (must be "function")')
        elif item["type"] != "function":
            # The only kind of tool Llama 3.1 is trained to call from a JSON definition.
            problems.append(f'{path}.type: must be "function" (got {_short(item["type"])})')
        body, body_path = item["function"], f"{path}.function"
    elif item.get("type") == "function" and not any(k in item for k in ("name", "description", "parameters")):
        problems.append(f'{path}: missing "function" (a {{type: "function", function: {{...}}}} tool)')
        return None
    else:
        body, body_path = item, path
    fields = _check_function_fields(body, body_path, problems)
    if len(problems) > before or fields is None:
        return None
    return {"type": "function", "function": fields}


def _check_function_fields(body: Any, path: str, problems: list[str]) -> dict | None:
    if not isinstance(body, Mapping):
        problems.append(f"{path}: must be an object with name, description and parameters (got {_short(body)})")
        return None
    for key in ("name", "description"):
        if key not in body:
            problems.append(f'{path}: missing "{key}"')
        elif not isinstance(body[key], str):
            problems.append(f"{_join(path, key)}: must be a string (got {_short(body[key])})")
        elif key == "name" and not body[key].strip():
            problems.append(f"{_join(path, key)}: must not be empty (the model calls a tool by its name)")
    if "parameters" not in body:
        problems.append(f'{path}: missing "parameters" (a JSON schema object; {_NO_ARGUMENTS_HINT})')
    else:
        _check_parameters(body["parameters"], _join(path, "parameters"), problems)
    return {
        "name": body.get("name"),
        "description": body.get("description"),
        "parameters": copy.deepcopy(body.get("parameters")),
    }


def _check_parameters(params: Any, path: str, problems: list[str]) -> None:
    if not isinstance(params, Mapping):
        problems.append(
            f'{path}: must be an object with "type" and "properties" (got {_short(params)}); {_NO_ARGUMENTS_HINT}'
        )
        return
    if "type" not in params:
        problems.append(f'{path}: missing "type" (usually "object")')
    elif not isinstance(params["type"], str):
        problems.append(f"{_join(path, 'type')}: must be a string (got {_short(params['type'])})")
    if "required" in params:
        required, required_path = params["required"], _join(path, "required")
        if not isinstance(required, (list, tuple)):
            problems.append(f"{required_path}: must be a list of parameter names (got {_short(required)})")
        else:
            for j, name in enumerate(required):
                if not isinstance(name, str):
                    problems.append(f"{required_path}[{j}]: must be a string (got {_short(name)})")
    if "properties" not in params:
        problems.append(f'{path}: missing "properties" (an object: parameter name -> {{type, description}})')
        return
    props_path = _join(path, "properties")
    props = params["properties"]
    if not isinstance(props, Mapping):
        problems.append(
            f"{props_path}: must be an object mapping parameter names to {{type, description}} (got {_short(props)})"
        )
        return
    for name, spec in props.items():
        prop_path = _join(props_path, name)
        if not isinstance(spec, Mapping):
            problems.append(f"{prop_path}: must be an object with type and description (got {_short(spec)})")
            continue
        for key in ("type", "description"):
            if key not in spec:
                problems.append(f'{prop_path}: missing "{key}"')
            elif not isinstance(spec[key], str):
                problems.append(f"{_join(prop_path, key)}: must be a string (got {_short(spec[key])})")


def _function_problems(functions: Any) -> list[str]:
    """`functions` ({name, code}) is Workers AI's embedded function calling: the platform runs the
    code and feeds its result back. A batch job runs no user code and has no second turn, and the
    model cannot call a tool whose arguments are undescribed, so the field is rejected, with the
    way to get the same answer from `tools`."""
    if not isinstance(functions, (list, tuple)):
        return [f"functions: must be a list of {{name, code}} objects (got {_short(functions)})"]
    problems = []
    for i, item in enumerate(functions):
        path = f"functions[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{path}: must be an object with name and code (got {_short(item)})")
            continue
        for key in ("name", "code"):
            if key not in item:
                problems.append(f'{path}: missing "{key}"')
            elif not isinstance(item[key], str):
                problems.append(f"{path}.{key}: must be a string (got {_short(item[key])})")
    if functions:
        problems.insert(
            0,
            "functions: not supported: batch jobs do not run request code (Workers AI's embedded "
            "function calling); describe each function in 'tools' as {name, description, parameters} "
            "and run the calls returned in the tool_calls column yourself",
        )
    return problems


# --------------------------------------------------------------------------------------------
# Answer side: tool calls in the generated text


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
    name order, or one Parquet file) as a list of row dicts, with `tool_calls` decoded to
    `[{name, arguments: dict}]`."""
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "parts")):
        path = os.path.join(path, "parts")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files in {path}")
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no such output file or folder: {path}")
    rows: list[dict] = []
    for file in files:
        for row in pq.read_table(file).to_pylist():
            if "tool_calls" in row:
                row["tool_calls"] = read_tool_calls(row["tool_calls"])
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# response_format: structured output for labelling jobs


class ResponseFormatError(ValueError):
    """A `response_format` that cannot be enforced. `problems` holds one line per broken rule,
    each naming its path inside `response_format` (empty for the value itself)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


_FORMAT_TYPES = ("json_schema", "json_object", "choice", "text")
_JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
_OPENAI_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


def validate_response_format(value: Any) -> dict | None:
    """Check a request's `response_format`; return the keyword arguments of vLLM's
    `StructuredOutputsParams` it stands for, or None for `{"type": "text"}` (no constraint).

    Accepted:
      {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}  -> {"json": schema}
      {"type": "json_schema", "json_schema": {...schema...}}  (Workers AI)    -> {"json": schema}
      {"type": "json_object"}                                                 -> {"json_object": True}
      {"type": "choice", "choices": ["a", "b"]}                               -> {"choice": ["a", "b"]}
      a bare JSON schema, e.g. {"type": "object", "properties": {...}}        -> {"json": schema}
    May be given as JSON text. Raises ResponseFormatError listing every problem.
    """
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ResponseFormatError([f"not valid JSON text ({exc.msg} at character {exc.pos})"]) from None
    if not isinstance(value, Mapping):
        raise ResponseFormatError(
            [f'must be an object such as {{"type": "json_schema", "json_schema": {{...}}}} (got {_short(value)})']
        )
    kind = value.get("type")
    if kind not in _FORMAT_TYPES:
        if isinstance(kind, str) and kind not in _JSON_TYPES:
            raise ResponseFormatError(
                [
                    f"type: must be one of {', '.join(_FORMAT_TYPES)} (or, for a bare JSON schema, "
                    f"one of {', '.join(_JSON_TYPES)}) (got {_short(kind)})"
                ]
            )
        return {"json": _checked_schema(value, "")}

    allowed = {"json_schema": {"type", "json_schema"}, "json_object": {"type"}, "choice": {"type", "choices"},
               "text": {"type"}}[kind]
    problems = [
        f"{_join('', key)}: not allowed with type {_short(kind)} (allowed: {', '.join(sorted(allowed))})"
        for key in value
        if key not in allowed
    ]
    if problems:
        raise ResponseFormatError(problems)
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "choice":
        return {"choice": _checked_choices(value.get("choices"))}

    if "json_schema" not in value:
        raise ResponseFormatError(['missing "json_schema" (the JSON schema the answer must follow)'])
    spec = value["json_schema"]
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ResponseFormatError(
                [f"json_schema: not valid JSON text ({exc.msg} at character {exc.pos})"]
            ) from None
    if isinstance(spec, Mapping) and spec and set(spec) <= _OPENAI_SCHEMA_KEYS:
        # OpenAI's wrapper: {name, schema, strict}. Guided decoding is always strict, so only
        # the schema matters.
        if "schema" not in spec:
            raise ResponseFormatError(
                ['json_schema: missing "schema" (give the schema as json_schema.schema, or as json_schema itself)']
            )
        return {"json": _checked_schema(spec["schema"], "json_schema.schema")}
    return {"json": _checked_schema(spec, "json_schema")}


def _checked_choices(choices: Any) -> list[str]:
    if choices is None:
        raise ResponseFormatError(['missing "choices" (a list of the strings the answer may be)'])
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ResponseFormatError([f"choices: must be a non-empty list of strings (got {_short(choices)})"])
    problems = []
    seen = set()
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            problems.append(f"choices[{i}]: must be a non-empty string (got {_short(choice)})")
        elif choice in seen:
            problems.append(f"choices[{i}]: duplicate choice {_short(choice)}")
        else:
            seen.add(choice)
    if problems:
        raise ResponseFormatError(problems)
    return list(choices)


@lru_cache(maxsize=8)
def _metaschema_validator(cls: type) -> Any:
    return cls(cls.META_SCHEMA)


def _checked_schema(schema: Any, path: str) -> dict:
    """`schema` checked against its JSON Schema draft's metaschema (`$schema`, else 2020-12)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ResponseFormatError(
                [f"{path or 'schema'}: not valid JSON text ({exc.msg} at character {exc.pos})"]
            ) from None
    if not isinstance(schema, Mapping):
        raise ResponseFormatError(
            [
                f"{path or 'schema'}: must be a JSON schema object, "
                f'e.g. {{"type": "object", ...}} (got {_short(schema)})'
            ]
        )
    schema = copy.deepcopy(dict(schema))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        errors = sorted(
            _metaschema_validator(cls).iter_errors(schema), key=lambda e: [str(p) for p in e.absolute_path]
        )
    except RecursionError:
        raise ResponseFormatError([f"{path or 'schema'}: nested too deeply to check"]) from None
    if errors:
        raise ResponseFormatError([_describe_schema_error(e, path) for e in errors])
    return schema


def _describe_schema_error(error: jsonschema.ValidationError, path: str) -> str:
    where = path
    for part in error.absolute_path:
        where = _join(where, part)
    where = where or "schema"
    got = _short(error.instance)
    parts = list(error.absolute_path)
    if parts and parts[-1] == "type" and error.validator in ("anyOf", "enum", "type"):
        return f"{where}: must be one of {', '.join(_JSON_TYPES)}, or a list of them (got {got})"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where}: must be of type {expected} (got {got})"
    if error.validator == "minimum":
        return f"{where}: must be >= {error.validator_value} (got {got})"
    if error.validator == "uniqueItems":
        return f"{where}: items must be unique (got {got})"
    return f"{where}: {error.message}"


# --------------------------------------------------------------------------------------------
# Message helpers


def _join(path: str, key: Any) -> str:
    """`path` extended by a key: `a.b`, `a[3]`, or `a["odd key"]` when the key is not a name."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    key = str(key)
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _short(value: Any, limit: int = 40) -> str:
    """The value as JSON when short, else what kind of value it is."""
    if value is None:
        return "null"
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return f"{text[:limit - 10]}…\" ({len(value)} characters)"
    if isinstance(value, Mapping):
        return f"an object with {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    return f"{text[:limit - 10]}…"
