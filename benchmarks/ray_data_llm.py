"""Contender: Ray Data LLM, `ray.data.llm`'s vLLM processor, the library a user would reach for
instead of the job.

Its chat-template and tokenize stages, then its engine stage, with the job's engine arguments,
batch size, worker count and engine threads, on the same messages and sampling parameters (seeds
included). Its rows render one token longer than the job's (its tokenize stage adds a second
`<|begin_of_text|>`), so its texts differ; the work is the same within half a percent.
"""

from __future__ import annotations

import json
import time

from benchmarks.job_config import JobSetup
from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.results import RunResult

NAME = "Ray Data LLM"


def write_processor_input(path, requests: list[dict], prepared) -> str:
    """The processor's input: each row's id, its messages and the job's sampling parameters for it
    (`prepared`: the job's prepared columns for `requests`, in the same order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": prepared.column("_id"), "messages": [r["messages"] for r in requests],
                             "params": prepared.column("_params")}), path)
    return str(path)


def run_raydata(input_path: str, setup: JobSetup, engine_kwargs: dict, mem: TreeMemory) -> RunResult:
    """The processor over the rows at `input_path` (see `write_processor_input`)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    settings = setup.settings
    kwargs = {k: v for k, v in engine_kwargs.items() if k not in ("model", "tokenizer")}
    stage = {"batch_size": settings.batch_size, "num_cpus": settings.prepare.num_cpus, "concurrency": 1}
    gpu = setup.device == "gpu"
    config = vLLMEngineProcessorConfig(
        model_source=engine_kwargs["model"],
        engine_kwargs=kwargs,
        batch_size=settings.batch_size,
        concurrency=settings.workers,
        # What the job's workers ask for: on a GPU-less cluster CPUs only.
        placement_group_config={"bundles": [{"CPU": setup.engine["num_cpus"], "GPU": setup.engine["num_gpus"]}
                                            if gpu else {"CPU": setup.engine["num_cpus"]}]},
        # Its default exports metrics through Ray's Prometheus endpoint, which this Ray lacks.
        log_engine_metrics=False,
        # Ray sets OMP_NUM_THREADS from the actor's (fractional) CPU claim, i.e. 1: give its
        # engine the threads the job's engine computes with (engine.cpu_threads).
        runtime_env=None if gpu else {"env_vars": {"OMP_NUM_THREADS": str(setup.engine["cpu_threads"])}},
        chat_template_stage=stage,
        tokenize_stage=stage,
        # The engine already detokenizes (as the job's does); a second pass would be extra work.
        detokenize_stage=False,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": json.loads(row["messages"]),
                                "sampling_params": json.loads(row["params"])},
        postprocess=lambda row: {"id": row["id"], "text": row["generated_text"], "out": row["num_generated_tokens"],
                                 "prompt": row["num_input_tokens"]},
        builder_kwargs={"chat_template_kwargs": {"date_string": settings.prompt.date_string}},
    )
    mem.settle()
    with mem.window(NAME) as w:
        started = time.perf_counter()
        first = None
        texts, out_tokens, prompt_tokens, batches = {}, 0, 0, 0
        for batch in processor(ray.data.read_parquet(input_path)).iter_batches(batch_format="pyarrow", batch_size=None):
            if first is None and batch.num_rows:
                first = time.perf_counter() - started
            texts.update(zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()))
            out_tokens += sum(batch.column("out").to_pylist())
            prompt_tokens += sum(batch.column("prompt").to_pylist())
            batches += 1
        wall = time.perf_counter() - started
    return RunResult(name=NAME, rows=len(texts), output_tokens=out_tokens, prompt_tokens=prompt_tokens, wall_s=wall,
                     time_to_first_row_s=first, memory=memory_figures(w), output_batches=batches, texts=texts)
