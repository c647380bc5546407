"""`response_format`: a request's (or a job's) structured-output constraint, checked and mapped
onto vLLM's structured outputs.

`validate_response_format` accepts OpenAI's and Workers AI's `json_schema`, a bare JSON schema,
`json_object`, `choice` and `text`, checks a schema against its draft's metaschema, and returns
the keyword arguments of vLLM's `StructuredOutputsParams` (or None for no constraint). It raises
`ResponseFormatError` listing every problem with its path inside `response_format`.

Pure module: stdlib + jsonschema (vLLM is not imported; the engine builds the params).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jsonschema

from pipeline.errors import UserError
from pipeline.tool_definitions import _join, _short

__all__ = ["ResponseFormatError", "validate_response_format"]


class ResponseFormatError(UserError):
    """A `response_format` that cannot be enforced. `problems` holds one line per broken rule,
    each naming its path inside `response_format` (empty for the value itself); the message joins
    them with "; "."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        # One line, not UserError's list: a row's `error` cell and the config message embed it.
        self.args = ("; ".join(self.problems),)


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
