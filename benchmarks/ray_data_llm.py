"""Contender: Ray Data LLM, `ray.data.llm`'s vLLM processor, the library a user would reach for
instead of the job.

Its chat-template and tokenize stages, then its engine stage, with the job's engine arguments,
batch size, worker count and engine threads, on the same messages and sampling parameters (seeds
included). Its rows render one token longer than the job's (its tokenize stage adds a second
`<|begin_of_text|>`), so its texts differ; the work is the same within half a percent.

As the job runs by default, it runs as a script of its own (`python -m benchmarks.ray_data_llm
SPEC`) that starts its own Ray, runs the processor and shuts Ray down, timed from the process's
start to its exit; with `--job-in-ray` it runs in the benchmark's Ray, as the job does then.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchmarks.job_config import ROOT, JobSetup
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


def processor_spec(setup: JobSetup, engine_kwargs: dict) -> dict:
    """What the processor is built from (plain data, for a script of its own): the job's engine
    arguments, batch size, workers, CPU claims and engine threads."""
    settings = setup.settings
    return {
        "engine_kwargs": {k: v for k, v in engine_kwargs.items() if k not in ("model", "tokenizer")},
        "model": engine_kwargs["model"],
        "batch_size": settings.batch_size,
        "stage_cpus": settings.prepare.num_cpus,
        "workers": settings.workers,
        "engine_cpus": setup.engine["num_cpus"],
        "engine_gpus": setup.engine["num_gpus"],
        "cpu_threads": setup.engine["cpu_threads"],
        "gpu": setup.device == "gpu",
        "date_string": settings.prompt.date_string,
    }


def build(spec: dict):
    """The processor `spec` describes (`processor_spec`)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    stage = {"batch_size": spec["batch_size"], "num_cpus": spec["stage_cpus"], "concurrency": 1}
    gpu = spec["gpu"]
    config = vLLMEngineProcessorConfig(
        model_source=spec["model"],
        engine_kwargs=spec["engine_kwargs"],
        batch_size=spec["batch_size"],
        concurrency=spec["workers"],
        # What the job's workers ask for: on a GPU-less cluster CPUs only.
        placement_group_config={"bundles": [{"CPU": spec["engine_cpus"], "GPU": spec["engine_gpus"]}
                                            if gpu else {"CPU": spec["engine_cpus"]}]},
        # Its default exports metrics through Ray's Prometheus endpoint, which this Ray lacks.
        log_engine_metrics=False,
        # Ray sets OMP_NUM_THREADS from the actor's (fractional) CPU claim, i.e. 1: give its
        # engine the threads the job's engine computes with (engine.cpu_threads).
        runtime_env=None if gpu else {"env_vars": {"OMP_NUM_THREADS": str(spec["cpu_threads"])}},
        chat_template_stage=stage,
        tokenize_stage=stage,
        # The engine already detokenizes (as the job's does); a second pass would be extra work.
        detokenize_stage=False,
    )
    return build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": json.loads(row["messages"]),
                                "sampling_params": json.loads(row["params"])},
        postprocess=lambda row: {"id": row["id"], "text": row["generated_text"], "out": row["num_generated_tokens"],
                                 "prompt": row["num_input_tokens"]},
        builder_kwargs={"chat_template_kwargs": {"date_string": spec["date_string"]}},
    )


def process_rows(spec: dict, input_path: str) -> dict:
    """The processor over the rows at `input_path`, in this process's Ray: the texts by id, the
    token counts, the batches, and when (seconds since the epoch) the first batch came back."""
    import ray

    first = None
    texts, out_tokens, prompt_tokens, batches = {}, 0, 0, 0
    for batch in build(spec)(ray.data.read_parquet(input_path)).iter_batches(batch_format="pyarrow", batch_size=None):
        if first is None and batch.num_rows:
            first = time.time()
        texts.update(zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()))
        out_tokens += sum(batch.column("out").to_pylist())
        prompt_tokens += sum(batch.column("prompt").to_pylist())
        batches += 1
    return {"texts": texts, "output_tokens": out_tokens, "prompt_tokens": prompt_tokens, "batches": batches,
            "first_row_at": first}


def run_raydata(input_path: str, setup: JobSetup, engine_kwargs: dict, mem: TreeMemory, workdir=None,
                ray_cpus: float | None = None, in_ray: bool = False) -> RunResult:
    """The processor over the rows at `input_path` (see `write_processor_input`): as a script of its
    own with its own Ray of `ray_cpus` CPUs, timed as a whole process, or (`in_ray`) in the
    benchmark's running Ray."""
    import tempfile
    from pathlib import Path

    spec = processor_spec(setup, engine_kwargs)
    mem.settle()
    if in_ray:
        with mem.window(NAME) as w:
            started = time.time()
            got = process_rows(spec, input_path)
    else:
        with tempfile.TemporaryDirectory(prefix="ray-data-llm-", dir=workdir) as tmp:
            folder = Path(tmp)
            (folder / "spec.json").write_text(json.dumps({**spec, "input": input_path, "ray_cpus": ray_cpus,
                                                          "out": str(folder / "result.json")}))
            with mem.window(NAME) as w:
                started = time.time()
                proc = subprocess.run([sys.executable, "-m", "benchmarks.ray_data_llm", str(folder / "spec.json")],
                                      cwd=ROOT, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"Ray Data LLM failed: {proc.stderr[-3000:]}")
            got = json.loads((folder / "result.json").read_text())
    first = got["first_row_at"]
    return RunResult(name=NAME, rows=len(got["texts"]), output_tokens=got["output_tokens"],
                     prompt_tokens=got["prompt_tokens"], wall_s=w["wall"],
                     time_to_first_row_s=None if first is None else first - started, memory=memory_figures(w),
                     output_batches=got["batches"], texts=got["texts"])


def main(spec_path: str) -> None:
    """The script: a Ray of its own, started as the job starts one (no dashboard, the job's worker
    environment), the processor over the spec's input, the result written, Ray shut down."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    spec = json.loads(open(spec_path).read())
    ray.init(address="local", num_cpus=spec["ray_cpus"], include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    got = process_rows(spec, spec["input"])
    with open(spec["out"], "w") as f:
        json.dump(got, f)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
