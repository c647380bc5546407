"""The benchmark (`python -m benchmarks`) runs end to end: a small size, where figures are not
asserted, only that every contender ran on the same rows and the report came out. Throughput
itself is measured by running the benchmark, not by tests: see docs/benchmark.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_script_runs_every_contender_on_the_same_rows(tiny_model_dir, tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PIPELINE_CACHE": str(Path(tiny_model_dir).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--phases", "bare,job,raydata,lora,label", "--rows", "24",
         "--max-tokens", "8", "--lora-adapters", "2", "--label-rows", "8", "--label-instruction-tokens", "300",
         # three batches, so the job has a rate between its first and last; one engine thread for
         # every contender (bare vLLM too, as it gets the job's threads when they are set)
         "--job-set", "batch_size=8", "--job-set", "engine.cpu_threads=1",
         "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    runs = {r["name"]: r for r in results["main"]["runs"]}
    assert set(runs) == {"bare vLLM", "job", "Ray Data LLM"}
    assert {r["output_tokens"] for r in runs.values()} == {24 * 8}
    assert runs["job"]["same_text_as_bare"] == 1.0  # same seeds, same tokens: the same text
    # The job ran as `python -m jobs.generate`, its own process and Ray: its first row is when its
    # log says the first rows were committed, within its whole run.
    assert 0 < runs["job"]["time_to_first_row_s"] < runs["job"]["wall_s"]
    assert "python -m jobs.generate" in runs["job"]["peak_rss_by_kind_gib"]
    # Ray Data LLM too, as a script of its own with its own Ray, on the same clock.
    assert 0 < runs["Ray Data LLM"]["time_to_first_row_s"] < runs["Ray Data LLM"]["wall_s"]
    assert "python -m benchmarks.ray_data_llm" in runs["Ray Data LLM"]["peak_rss_by_kind_gib"]
    summary = results["main"]["summary"]["job"]
    assert summary["over_bare"] > 0 and summary["over_raydata"] > 0
    # The job's rate from its first committed batch to its last, against bare vLLM's generate().
    assert runs["job"]["running_output_tokens_per_s"] > 0 and summary["running_over_generate"] > 0
    assert "running / generate()" in proc.stdout
    assert runs["bare vLLM"]["engine_threads"] == 1  # the job's engine.cpu_threads, as asked
    assert results["lora"]["mixed_over_none"] > 0 and results["lora"]["bare_mixed_over_none"] > 0
    # The labelling rows: one shared instruction (~300 tokens here), short answers, every contender.
    labelling = {r["name"]: r for r in results["labelling"]["runs"]}
    assert set(labelling) == {"bare vLLM", "job", "Ray Data LLM"}
    assert {r["output_tokens"] for r in labelling.values()} == {8 * 4}
    assert labelling["job"]["same_text_as_bare"] == 1.0 and results["labelling"]["prompt_tokens"]["min"] > 300
    assert "Labelling rows: one shared instruction" in proc.stdout
    assert "median over repeats" in proc.stdout and "/Ray Data LLM" in proc.stdout


def test_memory_scan_measures_the_job_and_bare_vllm_on_the_same_rows(tiny_model_dir, tmp_path):
    """One small size: the job as a user runs it and bare vLLM fed in calls of the job's rows in
    flight (here 2 batches of 8, so the 24 rows take two calls), each with its groups of processes."""
    out = tmp_path / "results.json"
    env = {**os.environ, "PIPELINE_CACHE": str(Path(tiny_model_dir).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--memory-scan", "--scan-rows", "24", "--max-num-seqs", "8",
         "--job-set", "batch_size=8", "--kv-cache-gib", "0.25", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {r["phase"]: r for r in json.loads(out.read_text())["memory_scan"]["runs"]}
    assert runs["job"]["output_tokens"] == runs["bare"]["output_tokens"] == 24 * 4
    assert {"engine actor", "python -m jobs.generate", "raylet"} <= set(runs["job"]["peak_rss_by_kind_gib"])
    assert runs["bare"]["peak_rss_by_kind_gib"]["python -c (script)"] > 0.5  # an engine in the script's process
    assert "each group of processes' own peak RSS" in proc.stdout
