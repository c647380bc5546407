"""The endpoint's pure parts: Workers AI's envelope and event framing, the request body read as the
batch job reads a row, the settings' checks, and the gates that admit requests to the engine."""

from __future__ import annotations

import asyncio
import json

import pytest

from pipeline.errors import UserError
from pipeline.serve import envelope
from pipeline.serve.gate import Admission, KindGate
from pipeline.serve.settings import ServeSettings
from tests.conftest import compose


def test_success_and_failure_envelopes_are_workers_ai_shaped():
    result = envelope.result("hi", [{"name": "f", "arguments": {"a": 1}}], 5, 2)
    assert envelope.success(result) == {
        "result": {"response": "hi", "tool_calls": [{"name": "f", "arguments": {"a": 1}}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
        "success": True, "errors": [], "messages": [],
    }
    assert envelope.failure("invalid request: x", 400) == {
        "result": None, "success": False, "errors": [{"code": 400, "message": "invalid request: x"}], "messages": []}
    assert "logprobs" not in envelope.result("", [], 1, 0, logprobs=None)


def test_events_frame_json_and_read_back():
    stream = (envelope.sse_event({"response": "a\n\nb"}) + envelope.sse_event({"response": "", "usage": {"x": 1}})
              + envelope.SSE_DONE).decode()
    assert stream.startswith('data: {"response": "a\\n\\nb"}\n\n')
    assert envelope.parse_sse(stream) == [{"response": "a\n\nb"}, {"response": "", "usage": {"x": 1}}, "[DONE]"]
    assert envelope.sse_event({"response": "é"}) == 'data: {"response": "é"}\n\n'.encode()


def test_body_gives_the_request_fields_a_row_would():
    body = json.dumps({"prompt": "hi", "seed": 3, "stream": True, "lora": None, "other": 1}).encode()
    fields = envelope.request_fields(body)
    assert fields == {"prompt": "hi", "seed": 3, "stream": True}
    assert json.loads(envelope.request_json(fields)) == fields
    for bad, words in ((b"[1, 2]", "JSON object"), (b"{nope", "not JSON"), (b"\xff{}", "not UTF-8")):
        with pytest.raises(envelope.BodyError, match=words):
            envelope.request_fields(bad)


def settings_for(*overrides, environ=None):
    return ServeSettings.from_config(compose("serve", ["model=tiny", *overrides]), environ=environ or {})


def test_the_config_composes_into_settings_and_the_preparer_sees_the_job_values():
    s = settings_for("seed=5", "request_defaults={temperature: 0}")
    assert (s.host, s.port, s.limits.max_pending, s.auth_required, s.serve.replicas) == ("127.0.0.1", 8000, 256,
                                                                                        False, 0)
    job = s.preparer_settings()
    assert (job.seed, job.request_defaults, job.prompt.date_string, job.label_probs) == (5, {"temperature": 0},
                                                                                         "26 Jul 2024", False)
    assert job.engine == s.engine and job.model == s.model


def test_listing_beyond_this_machine_needs_a_token():
    with pytest.raises(UserError) as info:
        settings_for("host=0.0.0.0")
    message = str(info.value)
    assert "LLAMA_BATCH_SERVE_TOKEN" in message and "auth.required=false" in message
    assert settings_for("host=0.0.0.0", environ={"LLAMA_BATCH_SERVE_TOKEN": "t"}).auth_required
    assert not settings_for("host=0.0.0.0", "auth.required=false").auth_required
    assert settings_for("auth.required=true", environ={"LLAMA_BATCH_SERVE_TOKEN": "t"}).auth_required
    assert "t" not in json.dumps(settings_for("auth.required=true",
                                              environ={"LLAMA_BATCH_SERVE_TOKEN": "t"}).record()).split('"')


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(UserError) as info:
        settings_for("port=70000", "limits.max_pending=0", "limits.max_body_bytes=10", "serve.replicas=-1",
                     "auth.required=maybe", "request_defaults={temperature: 9}")
    message = str(info.value)
    for name in ("port", "limits.max_pending", "limits.max_body_bytes", "serve.replicas", "auth.required",
                 "request_defaults.temperature"):
        assert f"- {name}:" in message, (name, message)


def test_admission_refuses_beyond_its_limit():
    gate = Admission(2)
    assert gate.try_admit() and gate.try_admit() and not gate.try_admit()
    gate.release()
    assert gate.try_admit() and (gate.pending, gate.rejected) == (2, 1)


def test_kind_gate_never_mixes_kinds_and_serves_in_arrival_order():
    async def scenario():
        gate, inside, order = KindGate(separate=True), set(), []

        async def request(name, kind, hold):
            async with gate.enter(kind):
                inside.add(kind)
                assert len(inside) == 1, inside
                order.append(name)
                await asyncio.sleep(hold)
                inside.discard(kind) if gate.inside == 1 else None

        tasks = []
        for name, kind in (("b1", "base"), ("b2", "base"), ("l1", "lora"), ("b3", "base"), ("l2", "lora")):
            tasks.append(asyncio.create_task(request(name, kind, 0.02)))
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    order = asyncio.run(scenario())
    # b3 arrived after l1 was queued: it waits its turn rather than overtaking.
    assert order == ["b1", "b2", "l1", "b3", "l2"]


def test_kind_gate_forgets_a_waiter_that_went_away():
    async def scenario():
        gate = KindGate(separate=True)
        release = asyncio.Event()

        async def hold():
            async with gate.enter("base"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(gate.enter("lora").__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        release.set()
        await asyncio.wait_for(holder, 5)
        async with gate.enter("lora"):
            return gate.kind, len(gate.waiters)

    assert asyncio.run(scenario()) == ("lora", 0)


@pytest.mark.parametrize("model", ["tiny", "tiny-awq", "llama-3.1-8b-instruct-awq"])
def test_the_endpoint_reads_the_jobs_model_prompt_date_and_registry(model):
    serve, generate = compose("serve", [f"model={model}"]), compose("generate", [f"model={model}"])
    assert serve.model == generate.model and serve.lora_root == generate.lora_root
    assert serve.prompt.date_string == generate.prompt.date_string
    settings = ServeSettings.from_config(serve, environ={})
    assert settings.engine.max_model_len == generate.engine.max_model_len


def test_an_answer_is_read_as_the_batch_job_reads_it():
    from pipeline.generate.answers import read_answer

    assert read_answer("plain text", []) == ("plain text", [], None)
    response, calls, status = read_answer('{"name": "get_weather", "parameters": {"city": "Paris"}}', ["get_weather"])
    assert (response, calls, status) == ("", [{"name": "get_weather", "arguments": {"city": "Paris"}}], "parsed")
