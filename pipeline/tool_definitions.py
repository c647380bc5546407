"""Tool definitions: the request's `tools` and `functions`, checked and normalised.

`normalize_tools` checks a request's tools against the model's input schema, gathering every
problem with its path, and returns them in the one shape Meta's Llama 3.1 chat template and
Hugging Face expect: `{"type": "function", "function": {name, description, parameters}}`.
`functions` (Workers AI's embedded function calling) is refused with the way to use `tools`.

Also home to the message helpers `_join` (a path extended by a key) and `_short` (a value as it
appears in a message), shared with `pipeline.response_format` and `pipeline.generate.answers`.

Pure module: stdlib + jsonschema at most, like the rest of the core (this one needs only the
stdlib and `pipeline.errors`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from pipeline.errors import UserError

__all__ = ["ToolSpecError", "normalize_tools"]


class ToolSpecError(UserError):
    """Tools or functions that break the input schema. `problems` holds one line per broken rule,
    each starting with the path of the offending value; the message joins them with "; "."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        # One line, not UserError's list: a row's `error` cell and the config message embed it.
        self.args = ("; ".join(self.problems),)


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
