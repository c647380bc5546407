"""Labelling and synthetic data through the real job on the tiny model: templates over plain
columns, n answers per row (ids, seeds, resume), stop strings and min_tokens, logprobs, label
probabilities, limit previews, and the recipes run as the README shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

PROMPTS = [f"Tell me something about item {i}." for i in range(16)]


def rows_of(path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(os.path.join(path, "parts")).to_pylist()}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "max_tokens": [12] * 16, "temperature": [1.0] * 16}), path)
    return path


@pytest.fixture
def job(ray_session, tiny_model_dir):
    """The generation job in-process on the real config with the tiny model."""
    from pipeline.generate.job import run
    from tests.conftest import compose

    def _run(input, output, *overrides, on_batch=None):
        cfg = compose("generate", ["model=tiny", f"model.path={tiny_model_dir}", f"input={input}",
                                   f"output.path={output}", "engine.kv_cache_gib=0.25", "ray.shutdown=false",
                                   "progress=false", *overrides])
        return run(cfg, on_batch=on_batch)

    return _run


def test_logprobs_and_n_answers_per_row_with_resume(job, prompts_file, tmp_path):
    one = tmp_path / "one"
    job(prompts_file, one, "top_logprobs=3")
    single = rows_of(one)
    for r in single.values():
        assert r["error"] is None and len(r["logprobs"]) == r["completion_tokens"]
        assert all(t["logprob"] is None or t["logprob"] <= 0 for t in r["logprobs"])
        assert all(len(t["top_logprobs"]) == 3 for t in r["logprobs"])
        tops = [[a["logprob"] for a in t["top_logprobs"]] for t in r["logprobs"]]
        assert all(x == sorted(x, reverse=True) for x in tops)

    three = tmp_path / "three"
    manifest = job(prompts_file, three, "n=3", "batch_size=4", "output.rows_per_part=12")
    answers = rows_of(three)
    assert sorted(answers) == sorted(f"{i}#{k}" for i in single for k in range(3))
    assert manifest["counts"]["rows_out"] == 48 and manifest["counts"]["rows_in"] == 48
    for row_id, r in single.items():
        first = answers[f"{row_id}#0"]
        # The first answer of n is the one answer of n=1: same seed, same prompt, same tokens.
        assert (first["seed"], first["response"], first["sample"]) == (r["seed"], r["response"], 0)
        assert len({answers[f"{row_id}#{k}"]["seed"] for k in range(3)}) == 3
    assert len({r["response"] for r in answers.values()}) > len(single)  # the answers differ

    # Interrupted once the first part is committed, then rerun: every answer once, identical.
    resumed = tmp_path / "resumed"
    seen = []

    def stop_after_first_part(batch):
        seen.append(batch.num_rows)
        if sum(seen) >= 12:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        job(prompts_file, resumed, "n=3", "batch_size=4", "output.rows_per_part=12", on_batch=stop_after_first_part)
    committed = pq.read_table(resumed / "parts").num_rows
    assert 12 <= committed < 48 and committed % 3 == 0 and not (resumed / "manifest.json").exists()
    manifest = job(prompts_file, resumed, "n=3", "batch_size=4", "output.rows_per_part=12")
    assert manifest["counts"]["rows_resumed"] == committed
    assert rows_of(resumed) == answers


def test_template_label_job_equals_the_same_requests_written_out(job, tmp_path):
    """A template over a plain column gives the rows the same answers as the requests it stands for;
    label probabilities sum to 1 over the labels; a null the template needs is that row's error."""
    texts = ["Great phone", "Broke in a day", None, "Okay for the price", "Love it", "Never again"]
    plain = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"uid": [f"r{i}" for i in range(6)], "text": texts}), plain)
    template = "Label this review: {{ text }}"
    labels = ["positive", "negative", "neutral"]
    written = tmp_path / "requests.parquet"
    pq.write_table(pa.table({
        "uid": [f"r{i}" for i in range(6)],
        "messages": [json.dumps([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": f"Label this review: {t}"}]) for t in texts],
    }), written)
    common = ["id_column=uid", f"response_format={{type: choice, choices: [{', '.join(labels)}]}}",
              "request_defaults={temperature: 0.8, max_tokens: 8}"]
    job(plain, tmp_path / "templated", *common, f"prompt.template='{template}'", "prompt.system='Be brief.'",
        "passthrough=[text]")
    job(written, tmp_path / "written", *common)
    templated, explicit = rows_of(tmp_path / "templated"), rows_of(tmp_path / "written")
    assert templated["r2"]["error"] == "template: column 'text' is null or missing in this row (prompt.template)"
    for uid in ("r0", "r1", "r3", "r4", "r5"):
        t, e = templated[uid], explicit[uid]
        assert t["error"] is None and t["response"] in labels and t["text"] == texts[int(uid[1:])]
        assert (t["response"], t["seed"], t["prompt_tokens"]) == (e["response"], e["seed"], e["prompt_tokens"])
        assert [p["label"] for p in t["label_probs"]] == labels
        assert abs(sum(p["prob"] for p in t["label_probs"]) - 1) < 1e-9
        assert t["label_probs"] == e["label_probs"]


def test_stop_strings_min_tokens_and_limit(job, tmp_path):
    """A stop string ends the answer right before it (same seed, same tokens up to there);
    min_tokens keeps answers from ending early; limit runs the same spread-out rows every time."""
    seeds = [1000 + i for i in range(len(PROMPTS))]
    base = tmp_path / "base.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "seed": seeds}), base)
    defaults = "request_defaults={temperature: 1.0, max_tokens: 24}"
    job(base, tmp_path / "free", defaults)
    answers = {r["source_row"]: r for r in rows_of(tmp_path / "free").values()}
    # Text from the middle of an answer: the same seeded answer must end right before its first occurrence.
    stops = {i: r["response"][6:9] for i, r in answers.items() if len(r["response"]) > 12}
    assert len(stops) >= 4
    stop_column = [stops.get(i) for i in range(len(PROMPTS))]
    with_stop = tmp_path / "stop.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "seed": seeds, "stop": stop_column,
                             "min_tokens": [None if s else 20 for s in stop_column]}), with_stop)
    job(with_stop, tmp_path / "stopped", defaults)
    stopped = {r["source_row"]: r for r in rows_of(tmp_path / "stopped").values()}
    assert set(stopped) == set(answers)
    for i, stop in stops.items():
        full = answers[i]["response"]
        assert stopped[i]["response"] == full[: full.index(stop)], i
        assert stopped[i]["finish_reason"] == "stop"
    for i in set(answers) - set(stops):
        assert stopped[i]["completion_tokens"] >= 20

    first, second = tmp_path / "preview1", tmp_path / "preview2"
    job(f"[{base},{with_stop}]", first, "limit=5")
    job(f"[{with_stop},{base}]", second, "limit=5")
    preview = rows_of(first)
    assert len(preview) == 5 and {r["source_file"] for r in preview.values()} == {"base.parquet", "stop.parquet"}
    assert sorted(preview) == sorted(rows_of(second))


def test_recipes_from_the_readme(tiny_model_dir, tmp_path):
    """recipe=label on the sample reviews (its plan, a preview, a retry with nothing to redo),
    recipe=synthesize on the sample topics, and recipe=judge over the synthesized answers, as the
    README runs them."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    common = ["model=tiny", f"model.path={tiny_model_dir}", "engine.kv_cache_gib=0.25", "ray.num_cpus=2"]

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "jobs.generate", *common, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    labels, synth, judged = tmp_path / "labels", tmp_path / "synth", tmp_path / "judged"
    planned = cli("recipe=label", "input=data/reviews.parquet", f"output.path={labels}", "plan=true")
    assert "plan: 48 rows -> 48 answers (48 ready" in planned.stderr and not labels.exists()
    cli("recipe=label", "input=data/reviews.parquet", f"output.path={labels}", "limit=12")
    rows = rows_of(labels)
    assert len(rows) == 12 and all(r["response"] in ("positive", "negative", "neutral") for r in rows.values())
    assert all(abs(sum(p["prob"] for p in r["label_probs"]) - 1) < 1e-9 for r in rows.values())
    retried = cli("recipe=label", "input=data/reviews.parquet", f"output.path={labels}", "limit=12", "retry=errors")
    assert "has no row to redo" in retried.stderr and rows_of(labels) == rows

    cli("recipe=synthesize", "input=data/topics.parquet", f"output.path={synth}", "n=2", "limit=4",
        "request_defaults.max_tokens=16")
    answers = rows_of(synth)
    assert len(answers) == 8 and all(r["topic"] and r["id"].endswith(("#0", "#1")) for r in answers.values())

    cli("recipe=judge", f"input={synth}/parts", f"output.path={judged}", "request_defaults.max_tokens=48")
    verdicts = rows_of(judged)
    assert set(verdicts) == set(answers)  # the first job's ids, joined on
    for r in verdicts.values():
        assert r["topic"] == answers[r["id"]]["topic"]
        if r["finish_reason"] == "stop":
            verdict = json.loads(r["response"])
            assert 1 <= verdict["score"] <= 5 and isinstance(verdict["reason"], str)


def test_plan_prepares_the_rows_as_the_job_does_and_writes_nothing(job, tmp_path):
    """plan=true: no engine, nothing written; its prompt tokens and failing rows are the job's own,
    and once a run has finished in the folder it estimates the time from that run's throughput."""
    sample = ROOT / "data" / "sample_requests.parquet"
    out = tmp_path / "planned"
    planned = job(sample, out, "plan=true", "limit=40")["plan"]
    assert not out.exists()
    assert planned["rows"] == planned["answers"] == 40 and planned["estimate_s"] is None
    manifest = job(sample, out, "limit=40")
    assert manifest["tokens"]["prompt"] == planned["prompt_tokens"]["total"]
    assert manifest["counts"]["errors"] == sum(planned["errors"].values()) == 40 - planned["ok"]
    again = job(sample, out, "plan=true", "limit=40")["plan"]
    assert again["estimate_s"] is not None and again["estimate_s"] > 0
