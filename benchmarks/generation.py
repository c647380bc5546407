"""The main comparison: the job against bare vLLM and Ray Data LLM, on the same rows.

Each repeat runs every contender once, back to back, in an order rotated between repeats. A job
run is compared with the bare engine and with Ray Data LLM of its own repeat (`over_bare`,
`over_raydata`); the summary takes the median of each figure over the repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks import bare_vllm, ray_data_llm
from benchmarks.job import run_job
from benchmarks.job_config import job_setup, threads_asked
from benchmarks.report import log
from benchmarks.results import RunResult, median, ratio, same_texts
from benchmarks.workload import make_requests, prepared_table, rotated, write_requests

PHASES = {"bare": bare_vllm.NAME, "job": "job", "raydata": ray_data_llm.NAME}
# Figures of a job run relative to the other contenders of its repeat.
RELATIVE = {"over_bare": bare_vllm.NAME, "over_raydata": ray_data_llm.NAME}


@dataclass(frozen=True)
class Contender:
    phase: str
    """bare, job or raydata: what runs."""
    name: str
    extra: tuple[str, ...] = ()
    """The job's own Hydra overrides (`--variant`)."""


def contenders(phases: list[str], variants: list[str]) -> list[Contender]:
    """The contenders of `phases`, in that order; each `--variant` (comma-separated overrides) is
    one more job, right after the plain one."""
    out = []
    for phase in phases:
        out.append(Contender(phase, PHASES[phase]))
        if phase == "job":
            out += [Contender("job", f"job [{v}]", tuple(x for x in v.split(",") if x)) for v in variants]
    return out


def compare_within_repeat(runs: list[RunResult]) -> None:
    """Set each job run's throughput relative to bare vLLM's and Ray Data LLM's of the same repeat,
    and its time to the first committed row relative to the bare engine's start-up (vLLM import and
    engine start: the least any script waits before its first row)."""
    by_name = {r.name: r for r in runs}
    bare = by_name.get(bare_vllm.NAME)
    for r in runs:
        if r.phase == "job":
            for key, name in RELATIVE.items():
                other = by_name.get(name)
                r.compared[key] = ratio(r.output_tokens_per_s, other.output_tokens_per_s if other else None)
            r.compared["first_row_over_bare_startup"] = ratio(r.time_to_first_row_s, bare.startup_s if bare else None)
            # The engines' rate once the first rows are out, against the bare engine's generate().
            r.compared["running_over_generate"] = ratio(r.running_output_tokens_per_s,
                                                        bare.engine_output_tokens_per_s if bare else None)


def summarize(runs: list[RunResult], todo: list[Contender]) -> dict:
    """Per contender, the median over repeats of its throughput, peak memory and (a job) ratios."""
    summary = {}
    for c in todo:
        mine = [r for r in runs if r.name == c.name]
        summary[c.name] = {
            "output_tokens_per_s": median([r.output_tokens_per_s for r in mine]),
            "engine_output_tokens_per_s": median([r.engine_output_tokens_per_s for r in mine]),
            "running_output_tokens_per_s": median([r.running_output_tokens_per_s for r in mine]),
            "peak_rss_gib": median([r.memory.peak_rss_gib for r in mine]),
            "time_to_first_row_s": median([r.time_to_first_row_s for r in mine]),
            "startup_s": median([r.startup_s for r in mine]),
            **({k: median([r.compared.get(k) for r in mine]) for k in (*RELATIVE, "first_row_over_bare_startup",
                                                                   "running_over_generate")}
               if c.phase == "job" else {}),
        }
    return summary


def main_comparison(args, model_path, workdir, mem, phases, time_left) -> dict:
    """The contenders of `phases` on `--rows` requests, `--repeats` times; the results' `main`."""
    return compare(args, model_path, workdir, mem, phases, time_left,
                   make_requests(args.rows, args.max_tokens, args.seed), make_requests(1, 1, args.seed), "requests")


def compare(args, model_path, workdir, mem, phases, time_left, requests: list[dict], one_request: list[dict],
            name: str) -> dict:
    """The contenders of `phases` on `requests` (and `one_request` for `--startup-runs`), `--repeats`
    times; `name` names their files in `workdir`."""
    input_path = write_requests(workdir / f"{name}.parquet", requests)
    one_row = write_requests(workdir / f"{name}-one-row.parquet", one_request)
    setup = job_setup(args, model_path, input_path)
    engine_kwargs = setup.engine_kwargs()
    prepared = prepared_table(input_path, setup.settings, model_path)
    lengths = sorted(len(t) for t in prepared.column("_prompt_token_ids").to_pylist())
    max_tokens = requests[0]["max_tokens"]
    log(f"{len(requests)} requests, prompt tokens min {lengths[0]} / median {lengths[len(lengths) // 2]} / max {lengths[-1]} "
        f"(total {sum(lengths)}), {max_tokens} output tokens each; engine: {engine_kwargs}")
    processor_input = ray_data_llm.write_processor_input(workdir / f"{name}-prepared.parquet", requests, prepared)
    processor_one = ray_data_llm.write_processor_input(
        workdir / f"{name}-prepared-one.parquet", one_request, prepared_table(one_row, setup.settings, model_path))
    todo = contenders(phases, args.variant)
    runs: list[RunResult] = []
    reference = None  # the first bare run's texts
    for rep in range(args.repeats):
        this_repeat = []
        for c in rotated(todo, rep):
            if not time_left(f"{c.name} (repeat {rep + 1})"):
                continue
            log(f"repeat {rep + 1}/{args.repeats}: {c.name} ...")
            startup = None
            if c.phase == "bare":
                r = bare_vllm.run_bare(prepared, engine_kwargs, mem, workdir, cpu_threads=threads_asked(args, setup))
            elif c.phase == "job":
                if args.startup_runs:
                    startup = run_job(args, model_path, one_row, workdir, mem, "job start-up", c.extra)
                r = run_job(args, model_path, input_path, workdir, mem, c.name, c.extra)
            else:
                where = {"workdir": workdir, "ray_cpus": args.ray_cpus, "in_ray": args.job_in_ray}
                if args.startup_runs:
                    startup = ray_data_llm.run_raydata(processor_one, setup, engine_kwargs, mem, **where)
                r = ray_data_llm.run_raydata(processor_input, setup, engine_kwargs, mem, **where)
            if startup is not None:
                r.startup_s = startup.wall_s
            reference = reference or (r.texts if c.phase == "bare" else None)
            r.compared["same_text_as_bare"] = same_texts(r.texts, reference) if reference is not None else None
            r.name, r.phase, r.rep = c.name, c.phase, rep + 1
            log(f"  {c.name}: {r.output_tokens_per_s:.0f} out tok/s end to end"
                + (f", {r.engine_output_tokens_per_s:.0f} in generate() alone" if r.engine_output_tokens_per_s else "")
                + f", wall {r.wall_s:.1f}s, peak RSS {r.memory.peak_rss_gib:.2f} GiB")
            this_repeat.append(r)
        compare_within_repeat(this_repeat)
        runs += this_repeat
    return {
        "rows": len(requests), "max_tokens": max_tokens,
        "prompt_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1], "total": sum(lengths)},
        "engine_kwargs": engine_kwargs, "job_settings_extra": args.job_set,
        "runs": [r.to_dict() for r in runs], "summary": summarize(runs, todo),
    }
