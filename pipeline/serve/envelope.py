"""Workers AI's wire format, as plain data: the JSON envelope every answer comes in, the request
body as the batch job's request fields, and server-sent events for `stream: true`.

    {"result": {"response": ..., "tool_calls": [...], "usage": {...}}, "success": true, "errors": [], "messages": []}
    {"result": null, "success": false, "errors": [{"code": 400, "message": "invalid request: ..."}], "messages": []}

    data: {"response": "<delta>"}      one event per piece of text
    data: {"response": "", "usage": {...}}   the last event (with `tool_calls` when tools were offered)
    data: [DONE]

Pure module: standard library only.
"""

from __future__ import annotations

import json

from pipeline.schema import REQUEST_FIELDS

SSE_DONE = b"data: [DONE]\n\n"


class BodyError(ValueError):
    """A body that is no request at all (not JSON, not an object): HTTP 400."""


def success(result: dict) -> dict:
    return {"result": result, "success": True, "errors": [], "messages": []}


def failure(message: str, code: int) -> dict:
    """An error answer; `message` is the text the batch job writes in its `error` column."""
    return {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def result(response: str, tool_calls: list[dict], prompt_tokens: int, completion_tokens: int, **extra) -> dict:
    """An answer's `result`: `response`, `tool_calls` (`[{"name", "arguments": {...}}]`), `usage`, and
    the extensions a request asked for (`logprobs`) where given."""
    out = {"response": response, "tool_calls": tool_calls, "usage": usage(prompt_tokens, completion_tokens)}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def request_fields(body: bytes) -> dict:
    """The body's request fields, as a batch row gives them: the schema's fields (and the batch
    job's extensions) that are not null; other keys are ignored, as other input columns are."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise BodyError(f"invalid request: the body is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                        f"at position {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise BodyError(f"invalid request: the body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BodyError(f"invalid request: the body must be a JSON object of request fields "
                        f"(got {type(data).__name__})")
    return {k: data[k] for k in REQUEST_FIELDS if data.get(k) is not None}


def request_json(fields: dict) -> str:
    """Request fields as the JSON text a batch row's are prepared from (`pipeline.generate.prepare`)."""
    return json.dumps(fields, ensure_ascii=False, allow_nan=True)


def sse_event(data: dict) -> bytes:
    """One server-sent event holding `data` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def parse_sse(text: str) -> list:
    """The events of a server-sent-event stream: each `data:` payload as JSON, `[DONE]` as the string."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:"))
        if block.strip():
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
