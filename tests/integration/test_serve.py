"""The endpoint, as a client sees it: `python -m jobs.serve` started as a subprocess on 127.0.0.1
(the tiny model, bearer-token auth on, a registry holding one adapter), driven over real HTTP with
httpx, and its playground page in headless Chromium.

One server for the module. It answers seeded requests (plain, streamed, with an adapter, refused)
exactly as the batch job answers the same rows; streams Workers AI's events; parses tool calls;
aborts a stream whose client went away; answers 200 concurrent requests each exactly once; answers
429 beyond its queue, 413 beyond its body limit, 401 without the token; and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.serve.envelope import parse_sse
from tests.integration.browser import ARTIFACTS, SCRIPT, launch_chromium
from tests.integration.test_resume_guards import publish_adapter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROUTE = "/ai/run/@cf/meta/llama-3.1-8b-instruct-awq"
ACCOUNT_ROUTE = "/client/v4/accounts/0123abc/ai/run/@cf/meta/llama-3.1-8b-instruct-awq"
TOKEN = "test-token-7f3a"
MAX_PENDING = 200
BODY_LIMIT = 65536
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                          "required": ["city"]}}
CALL_SCHEMA = {"type": "json_schema", "json_schema": {
    "type": "object",
    "properties": {"name": {"const": "get_weather"},
                   "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                  "required": ["city"], "additionalProperties": False}},
    "required": ["name", "parameters"], "additionalProperties": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """The registry folder; the server fixture publishes its adapter."""
    return tmp_path_factory.mktemp("serve_lora") / "lora"


@pytest.fixture(scope="module")
def server(tiny_model_dir, registry, tmp_path_factory):
    """The endpoint in a subprocess; stopped with SIGTERM (it must drain and exit by itself). The
    adapter is published while the server starts: the server looks adapters up on first use."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLAMA_BATCH_SERVE_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "jobs.serve", "model=tiny", f"model.path={tiny_model_dir}", f"port={port}",
           "engine.kv_cache_gib=0.25", f"lora_root={registry}", "auth.required=true",
           f"limits.max_pending={MAX_PENDING}", f"limits.max_body_bytes={BODY_LIMIT}", "limits.shutdown_grace_s=90"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        publish_adapter(tiny_model_dir, registry, "hello", seed=1)
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in 240 s:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield {"base": base, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["base"], headers={"authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def streamed(client, body: dict, route: str = ROUTE) -> tuple[httpx.Response, list]:
    with client.stream("POST", route, json={**body, "stream": True}) as res:
        text = res.read().decode()
    return res, parse_sse(text) if res.status_code == 200 else json.loads(text)


def joined(events: list) -> str:
    return "".join(e.get("response", "") for e in events if isinstance(e, dict))


# The requests both the batch job (as Parquet rows) and the endpoint answer: seeded, in both modes,
# sampled and greedy, with a stop string, with the adapter; then rows the job refuses.
REQUESTS = [
    {"prompt": "Tell me about the sea", "max_tokens": 24, "temperature": 0.9, "seed": 11},
    {"prompt": "Write a haiku", "max_tokens": 20, "temperature": 0.0, "seed": 12},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
     "max_tokens": 24, "temperature": 1.2, "top_p": 0.9, "top_k": 40, "seed": 9_999_999_999},
    {"prompt": "Count to ten", "max_tokens": 30, "temperature": 0.7, "seed": 14, "repetition_penalty": 1.3,
     "stop": ["e"]},
    {"prompt": "Bonjour", "max_tokens": 24, "temperature": 0.8, "seed": 15, "lora": "hello"},
    {"messages": [{"role": "user", "content": "Salut"}], "max_tokens": 16, "seed": 16, "lora": "hello"},
]
REFUSED = [
    {"prompt": "too hot", "temperature": 9.5, "seed": 1},
    {"prompt": "both", "messages": [{"role": "user", "content": "x"}], "seed": 2},
    {"prompt": "no such adapter", "lora": "nope", "seed": 3},
    {"prompt": "tools need messages", "tools": [WEATHER], "seed": 4},
]


def as_rows(requests: list[dict]) -> pa.Table:
    columns = sorted({k for r in requests for k in r})
    return pa.table({c: [json.dumps(r[c]) if c in ("messages", "tools") and c in r else r.get(c) for r in requests]
                     for c in columns})


def test_seeded_requests_get_the_batch_jobs_answers_plain_and_streamed(client, generate_job, registry, tmp_path):
    rows = REQUESTS + REFUSED
    source = tmp_path / "requests.parquet"
    pq.write_table(as_rows(rows), source)
    _, out = generate_job(str(source), f"lora_root={registry}")
    batch = {int(r["id"].split("#")[1]): r for r in pq.read_table(out + "/parts").to_pylist()}
    assert len(batch) == len(rows)

    for i, request in enumerate(REQUESTS):
        expected = batch[i]
        assert expected["error"] is None, expected
        plain = client.post(ROUTE if i % 2 else ACCOUNT_ROUTE, json=request)
        assert plain.status_code == 200, plain.text
        body = plain.json()
        assert body["success"] is True and body["errors"] == [] and body["messages"] == []
        assert body["result"]["response"] == expected["response"], (i, request)
        assert body["result"]["tool_calls"] == []
        assert body["result"]["usage"] == {"prompt_tokens": expected["prompt_tokens"],
                                           "completion_tokens": expected["completion_tokens"],
                                           "total_tokens": expected["prompt_tokens"] + expected["completion_tokens"]}
        res, events = streamed(client, request)
        assert res.headers["content-type"].startswith("text/event-stream")
        assert events[-1] == "[DONE]" and events[-2]["usage"] == body["result"]["usage"]
        assert joined(events) == expected["response"], (i, request)
        assert len([e for e in events if isinstance(e, dict) and e.get("response")]) > 1  # it came in pieces
    base, adapted = batch[0]["response"], client.post(ROUTE, json={**REQUESTS[0], "lora": "hello"}).json()
    assert adapted["result"]["response"] != base  # the adapter changes the answer

    for j, request in enumerate(REFUSED, start=len(REQUESTS)):
        error = batch[j]["error"]
        assert error, batch[j]
        for res in (client.post(ROUTE, json=request), streamed(client, request)[0]):
            assert res.status_code == 400
            assert json.loads(res.read()) == {"result": None, "success": False,
                                              "errors": [{"code": 400, "message": error}], "messages": []}


def test_a_forced_tool_call_comes_back_parsed(client):
    request = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
               "response_format": CALL_SCHEMA, "max_tokens": 60, "seed": 5}
    body = client.post(ROUTE, json=request).json()
    assert body["success"], body
    assert body["result"]["response"] == ""
    [call] = body["result"]["tool_calls"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
    _, events = streamed(client, request)
    assert events[-2]["tool_calls"] == body["result"]["tool_calls"] and events[-2]["response"] == ""
    # Offered but not forced: the tiny model's text is no call, and comes back as the response.
    free = client.post(ROUTE, json={**request, "response_format": None, "max_tokens": 12}).json()
    assert free["success"] and free["result"]["tool_calls"] == [] and free["result"]["response"]


def test_adapters_are_listed_and_a_bad_body_is_refused(client):
    listing = client.get("/adapters").json()["result"]["adapters"]
    assert [(a["name"], a["usable"]) for a in listing] == [("hello", True)]
    assert client.post(ROUTE, content=b"[1, 2]").json()["errors"][0]["message"].startswith("invalid request: ")
    big = client.post(ROUTE, json={"prompt": "x" * BODY_LIMIT})
    assert big.status_code == 413 and "limits.max_body_bytes" in big.json()["errors"][0]["message"]


def test_requests_without_the_token_are_refused(server):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        res = httpx.post(server["base"] + ROUTE, json={"prompt": "hi"}, headers=headers, timeout=30)
        assert res.status_code == 401 and res.json()["success"] is False
    assert httpx.get(server["base"] + "/stats", timeout=30).status_code == 401
    assert httpx.get(server["base"] + "/healthz", timeout=30).json() == {"status": "ok"}
    assert TOKEN not in server["log"].read_text()


def test_a_client_that_goes_away_aborts_its_request_in_the_engine(client, server):
    before = client.get("/stats").json()
    # min_tokens keeps the model from ending early: left alone it would run 1500 tokens.
    request = {"prompt": "Go on and on", "max_tokens": 1500, "min_tokens": 1500, "seed": 3, "stream": True}
    pieces = 0
    with client.stream("POST", ROUTE, json=request) as res:
        for line in res.iter_lines():
            pieces += line.startswith("data: ")
            if pieces == 3:
                break  # the client leaves mid-answer: the connection closes
    deadline = time.monotonic() + 60
    while True:
        stats = client.get("/stats").json()
        if stats["aborted"] == before["aborted"] + 1 and stats["engine_unfinished"] == stats["pending"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats["finished"] == before["finished"]
    # A plain (not streamed) request whose client gives up waiting is let go as well.
    with pytest.raises(httpx.ReadTimeout):
        client.post(ROUTE, json={**request, "stream": False}, timeout=httpx.Timeout(120, read=1.0))
    while True:
        stats = client.get("/stats").json()
        if stats["aborted"] == before["aborted"] + 2 and stats["engine_unfinished"] == stats["pending"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats["finished"] == before["finished"]  # neither ran to its end
    aborted = [line for line in server["log"].read_text().splitlines() if "aborted by its client" in line]
    assert len(aborted) == 2 and all(int(a.split(" after ")[1].split()[0]) < 1500 for a in aborted), aborted


def fire(base: str, n: int, body) -> list[tuple[int, str | None, float, dict]]:
    """`n` requests at once (`body(i)` each), from an event loop in a thread of its own."""
    out = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(_fire(base, n, body))))
    thread.start()
    thread.join(timeout=900)
    return out[0]


async def _fire(base: str, n: int, body) -> list[tuple[int, str | None, float, dict]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=300,
                                 limits=limits) as c:
        async def one(i):
            started = time.perf_counter()
            res = await c.post(ROUTE, json=body(i))
            return res.status_code, res.headers.get("x-request-id"), time.perf_counter() - started, res.json()

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 600)


def test_200_concurrent_requests_are_each_answered_once(client, server):
    before = client.get("/stats").json()
    started = time.perf_counter()
    results = fire(server["base"], 200, lambda i: {"prompt": f"Item {i}", "max_tokens": 8, "seed": i + 1})
    wall = time.perf_counter() - started
    assert [r[0] for r in results] == [200] * 200, {r[0] for r in results}
    assert len({r[1] for r in results}) == 200 and all(r[3]["success"] for r in results)
    latencies = sorted(r[2] for r in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    print(f"\n200 concurrent requests (8 tokens each) in {wall:.1f}s: p50 {p50:.2f}s, p99 {p99:.2f}s")
    after = client.get("/stats").json()
    assert after["finished"] - before["finished"] == 200 and after["pending"] == 0
    # The same request alone gives the same answer as under load.
    alone = client.post(ROUTE, json={"prompt": "Item 7", "max_tokens": 8, "seed": 8}).json()
    assert alone["result"]["response"] == results[7][3]["result"]["response"]


def test_beyond_the_queue_requests_get_429(client, server):
    before = client.get("/stats").json()
    n = MAX_PENDING + 60
    results = fire(server["base"], n, lambda i: {"prompt": f"Busy {i}", "max_tokens": 48,
                                                              "min_tokens": 48, "seed": i + 1})
    codes = [r[0] for r in results]
    busy = [r for r in results if r[0] == 429]
    assert set(codes) == {200, 429} and len(busy) >= n - MAX_PENDING - 20, sorted(set(codes))
    assert "limits.max_pending" in busy[0][3]["errors"][0]["message"]
    assert all(r[3]["result"]["usage"]["completion_tokens"] == 48 for r in results if r[0] == 200)
    after = client.get("/stats").json()
    assert after["rejected"] - before["rejected"] == len(busy)
    assert after["finished"] - before["finished"] == n - len(busy) and after["pending"] == 0


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


def test_the_playground_streams_an_answer_and_shows_typed_markup_as_text(server, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["base"] + "/")
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.wait_for_selector("#lora option[value=hello]", state="attached", timeout=30_000)
    # Count the updates of the answer: a streamed answer arrives in several events, each added to
    # the page as it is read (one mutation record each, however many events one network read holds).
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(records => window.updates += records.length).observe(document.getElementById('output'),
            {childList: true, characterData: true, subtree: true}); }""")
    page.fill("#user", f"Hello {SCRIPT}")
    page.fill("#max_tokens", "40")
    page.fill("#seed", "21")
    page.select_option("#lora", "hello")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-playground.png"
    page.evaluate("document.querySelector('details').open = true")
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    answer = page.evaluate("document.getElementById('output').textContent")
    assert answer and page.evaluate("window.updates") > 1
    assert "prompt" in page.inner_text("#usage")
    # What the user typed is on the page as text (the request shown), and never ran.
    assert SCRIPT in page.inner_text("#sent") and '"lora": "hello"' in page.inner_text("#sent")
    assert page.title().startswith("Playground") and page.locator("script").count() == 1 and not errors
    # The page's answer is the endpoint's for the same request.
    direct = httpx.post(server["base"] + ROUTE, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60, json={
        "messages": [{"role": "user", "content": f"Hello {SCRIPT}"}], "max_tokens": 40, "temperature": 0.6,
        "seed": 21, "lora": "hello"}).json()
    assert direct["result"]["response"] == answer
    page.close()


def test_sigterm_drains_the_requests_in_flight_then_exits(server):
    """Last in the module: the server stops here."""
    proc, base = server["proc"], server["base"]
    headers = {"authorization": f"Bearer {TOKEN}"}

    answers = []
    # A thread, not asyncio: the browser's Playwright keeps an event loop in this thread.
    running = threading.Thread(target=lambda: answers.append(httpx.post(
        base + ROUTE, headers=headers, timeout=120,
        json={"prompt": "long", "max_tokens": 400, "min_tokens": 400, "seed": 1})))
    running.start()
    deadline = time.monotonic() + 60
    while httpx.get(base + "/stats", headers=headers, timeout=30).json()["engine_unfinished"] < 1:
        assert time.monotonic() < deadline and running.is_alive()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # while the request runs
    running.join(timeout=120)
    [res] = answers
    assert res.status_code == 200 and res.json()["result"]["usage"]["completion_tokens"] == 400
    assert proc.wait(timeout=120) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/healthz", timeout=5)
