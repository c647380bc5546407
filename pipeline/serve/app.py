"""The endpoint as an ASGI app (FastAPI): Workers AI's route for the model, health and readiness,
the registry's adapters, the engine's counters, and the playground page.

    POST /ai/run/@cf/meta/llama-3.1-8b-instruct-awq
    POST /client/v4/accounts/{account_id}/ai/run/@cf/meta/llama-3.1-8b-instruct-awq
    GET  /healthz   the process answers          GET /readyz  the engine takes requests (503 if not)
    GET  /adapters  the registry's adapters      GET /stats   requests finished, aborted, rejected
    GET  /          the playground

Every answer to the model's route is Workers AI's envelope (`pipeline.serve.envelope`); a request
the batch job would refuse gets HTTP 400 with the text the job writes in its `error` column. The
same app runs under uvicorn (`pipeline.serve.server`) and in Ray Serve replicas
(`pipeline.serve.replicas`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from pipeline.generate.answers import read_answer
from pipeline.generate.prepare import safe_text
from pipeline.serve import envelope
from pipeline.serve.gate import Admission
from pipeline.serve.settings import ServeSettings

log = logging.getLogger(__name__)

MODEL = "@cf/meta/llama-3.1-8b-instruct-awq"
SERVED_BY = f"{socket.gethostname()}:{os.getpid()}"
# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.5


class BodyTooLarge(Exception):
    pass


def create_app(settings: ServeSettings, engine=None, served_by: str | None = None) -> FastAPI:
    """The app over `engine` (default: a `pipeline.serve.engine.ServeEngine` on `settings`, started
    when the app starts and shut down when it stops)."""
    if engine is None:
        from pipeline.serve.engine import ServeEngine

        engine = ServeEngine(settings)
    token = os.environ.get(settings.auth.token_env) if settings.auth_required else None
    admission = Admission(settings.limits.max_pending)
    state = {"draining": False}
    served_by = served_by or SERVED_BY

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="llama-batch-pipeline endpoint", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.drain = lambda: state.update(draining=True)

    def answer(body: dict, status: int = 200, request_id: str | None = None) -> JSONResponse:
        headers = {"x-served-by": served_by}
        if request_id:
            headers["x-request-id"] = request_id
        if status == 429:
            headers["retry-after"] = "1"
        return JSONResponse(body, status_code=status, headers=headers)

    def refused(request: Request) -> JSONResponse | None:
        """401 unless the request carries the token (when auth is on)."""
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return answer(envelope.failure("authentication error: send the header 'Authorization: Bearer <token>'",
                                           401), 401)
        return None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready = engine.ready and not state["draining"]
        return JSONResponse({"ready": ready, "draining": state["draining"]}, status_code=200 if ready else 503)

    @app.get("/stats")
    async def stats(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        return {**engine.stats(), "pending": admission.pending, "rejected": admission.rejected,
                "served_by": served_by}

    @app.get("/adapters")
    async def adapters(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        return envelope.success({"adapters": engine.adapters.listing()})

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("pipeline.serve").joinpath("playground.html").read_text("utf-8"))

    @app.post(f"/ai/run/{MODEL}")
    async def run_model(request: Request):
        return await _run(request)

    @app.post(f"/client/v4/accounts/{{account_id}}/ai/run/{MODEL}")
    async def run_model_for_account(request: Request, account_id: str):
        return await _run(request)

    async def _run(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        if not engine.ready or state["draining"]:
            return answer(envelope.failure("the server is not ready (starting or shutting down); retry later", 503),
                          503)
        try:
            body = await read_body(request, settings.limits.max_body_bytes)
            fields = envelope.request_fields(body)
        except BodyTooLarge:
            return answer(envelope.failure(f"request too large: bodies of at most {settings.limits.max_body_bytes:,} "
                                           "bytes are accepted (limits.max_body_bytes)", 413), 413)
        except envelope.BodyError as exc:
            return answer(envelope.failure(str(exc), 400), 400)
        if not admission.try_admit():
            return answer(envelope.failure(f"too many requests: {settings.limits.max_pending} are being answered "
                                           "(limits.max_pending); retry later", 429), 429)
        request_id = uuid.uuid4().hex
        try:
            prepared = engine.prepare(request_id, envelope.request_json(fields))
        except Exception as exc:  # as the batch job words a row that fails this way
            prepared = {"_error": f"preparing failed: {type(exc).__name__}: {exc}"}
        if prepared.get("_error") is not None:
            admission.release()
            return answer(envelope.failure(safe_text(prepared["_error"]), 400), 400, request_id)
        if fields.get("stream") is True:
            return EventStream(_stream(request_id, prepared), on_close=admission.release,
                               headers={"x-request-id": request_id, "x-served-by": served_by,
                                        "cache-control": "no-cache"})
        try:
            last = await _whole(request, request_id, prepared)
            if last is None:  # the client went away; the engine has let the request go
                return answer(envelope.failure("the client closed the connection", 499), 499, request_id)
        except Exception as exc:
            log.warning("request %s failed in the engine: %s", request_id, exc)
            return answer(envelope.failure(f"engine error: {type(exc).__name__}: {exc}", 500), 500, request_id)
        finally:
            admission.release()
        response, calls, _ = read_answer(last.text, prepared.get("_tools") or [])
        result = envelope.result(response, calls, last.prompt_tokens, last.completion_tokens,
                                 logprobs=engine.logprobs(prepared, last))
        return answer(envelope.success(result), 200, request_id)

    async def _whole(request: Request, request_id: str, prepared: dict):
        """The whole answer, or None once the client has disconnected (the request is then
        cancelled, which aborts it in the engine)."""

        async def last_piece():
            last = None
            async for last in engine.generate(request_id, prepared, stream=False):
                pass
            return last

        task = asyncio.create_task(last_piece())
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None

    async def _stream(request_id: str, prepared: dict):
        """Server-sent events: each new piece of text as it comes; with tools offered, the answer
        once whole (it may be a call), with its `tool_calls`; usage last; then [DONE]."""
        tools = prepared.get("_tools") or []
        try:
            last = None
            async for last in engine.generate(request_id, prepared, stream=True):
                if last.delta and not tools:
                    yield envelope.sse_event({"response": last.delta})
            final: dict = {"response": ""}
            if tools:
                final["response"], final["tool_calls"], _ = read_answer(last.text, tools)
            final["usage"] = envelope.usage(last.prompt_tokens, last.completion_tokens)
            if (logprobs := engine.logprobs(prepared, last)) is not None:
                final["logprobs"] = logprobs
            yield envelope.sse_event(final)
        except Exception as exc:
            log.warning("request %s failed in the engine: %s", request_id, exc)
            yield envelope.sse_event({"error": f"engine error: {type(exc).__name__}: {exc}"})
        yield envelope.SSE_DONE

    return app


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` once the response is over, however it ends: sent
    whole, or cut off by the client, even before its first event (when the events' generator
    never starts, its own cleanup never runs)."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (`BodyTooLarge`) as soon as it is known to pass `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)
