"""Throughput and memory of the generation job against bare vLLM and Ray Data LLM.

    python -m benchmarks                           # bare vLLM, the job, Ray Data LLM, LoRA, training, labelling, prefix
    python -m benchmarks --rows 512 --max-tokens 128 --repeats 2 --out results.json
    python -m benchmarks --phases bare,job --job-set batch_size=256    # try a job setting
    python -m benchmarks --memory-scan             # peak memory at 1k, 5k and 20k rows: the job, bare vLLM
    python -m benchmarks --phases label            # rows sharing a ~1,000-token instruction, short answers
    python -m benchmarks --phases prefix           # questions about many long documents: rows grouped or not
    python -m benchmarks --driver-scale            # planning 10,000 files, committing 1 M rows, no engine

Everything runs in one process, with the project's tiny model on the CPU, against one Ray instance
started there (as the integration tests do), on the same rows (`workload`): mixed-length chat
requests, fixed `max_tokens` with `ignore_eos`, every row seeded, so each contender produces
exactly the same number of output tokens and (bare vLLM and the job) the same text. The job is
driven only through its public entry points (`pipeline.generate.job.run` and its `on_batch`
seam, `preparer_for`), never patched.

One module per contender, each returning a `results.RunResult` (or `TrainResult`):

    bare_vllm     `vllm.LLM.generate` over every prompt in one call: the engine's ceiling
    job           `pipeline.generate.job.run` on the composed `conf/generate.yaml`
    ray_data_llm  `ray.data.llm`'s vLLM processor with the same engine arguments and batch size
    lora          the job and a bare engine, rows spread over random adapters against none
    plain_peft    the textbook PEFT training loop, against `pipeline.train.job` (`training`)

and one per comparison: `generation` (the first three), `labelling` (the first three on rows that
share a long instruction), `prefix_groups` (the job grouped by prefix and not, bare vLLM on sorted
and shuffled rows, with their prefix-cache hit rates), `lora`, `training`, `batch_scan`, `memory_scan`, and `driver_scale` (the
driver's planning and commit limits, no engine). `memory` samples the process tree, `report`
prints, `cli` reads the flags. `--device gpu --model llama-3.1-8b-instruct-awq` runs the same
comparisons on a GPU with the job's GPU settings.

Each contender's wall time includes starting its engine, since a batch job pays that too; the
bare engine's start-up is also shown on its own. Memory is the summed RSS (and PSS) of this
process and all its descendants (Ray's daemons, its workers, engine subprocesses), sampled in
a background thread; each run reports the peak and its rise over the run's start, and each
group of processes' own peak (the driver, the engine actors, Ray's workers and daemons).

The machine is usually shared, so ratios are taken within one repeat (the contenders of a
repeat run back to back, in an order rotated between repeats) and summarised by their median.
See docs/benchmark.md for the figures.
"""
