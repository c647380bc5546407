"""Faults and resumes: a killed driver, a killed worker, an engine that cannot start, a row that
makes the engine raise, damaged files. After any of them, every input id is in the output
exactly once, with the same content as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate.config import ConfigError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def requests(n: int, max_tokens: int = 6) -> list[dict]:
    return [
        {"prompt": f"Tell me something about number {i}", "max_tokens": max_tokens + i % 7, "temperature": 0.8,
         "seed": (i + 1) * 31 if i % 5 == 0 else None}
        for i in range(n)
    ]


def output_rows(out) -> list[dict]:
    return pq.read_table(os.path.join(out, "parts")).to_pylist()


def content(rows) -> dict:
    return {r["id"]: (r["response"], r["completion_tokens"], r["seed"], r["error"]) for r in rows}


def job_command(tiny_model_dir, input, out, *overrides):
    return [sys.executable, "-m", "jobs.generate", "model=tiny", f"model.path={tiny_model_dir}", f"input={input}",
            f"output.path={out}", "engine.kv_cache_gib=0.25", "ray.num_cpus=2", "progress=false", *overrides]


def test_driver_killed_then_rerun_gives_every_row_once_and_identical(generate_job, tiny_model_dir, tmp_path):
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(requests(600, max_tokens=40)), src, row_group_size=100)
    reference, ref_out = generate_job(src, output=str(tmp_path / "reference"))
    expected = content(output_rows(ref_out))

    out = tmp_path / "killed"
    overrides = ("output.rows_per_part=40", "batch_size=20")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.Popen(job_command(tiny_model_dir, src, out, *overrides), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "parts").glob("part-*.parquet")):
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    committed = {r["id"] for r in output_rows(out)}
    assert 0 < len(committed) < 600 and not (out / "manifest.json").exists()

    rerun = subprocess.run(job_command(tiny_model_dir, src, out, *overrides), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = output_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 600
    assert content(rows) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    # The rerun generated only what was missing: committed rows were not generated again.
    assert manifest["counts"]["rows_resumed"] >= len(committed)
    assert manifest["counts"]["rows_generated"] == 600 - manifest["counts"]["rows_resumed"]
    covered = sorted(r for p in manifest["parts"] for a, b in p["covers"]["in.parquet"] for r in range(a, b + 1))
    assert covered == list(range(600))


def test_crash_after_last_part_before_manifest(generate_job, tmp_path):
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(requests(50)), src)
    first, out = generate_job(src, "output.rows_per_part=10")
    before = content(output_rows(out))
    os.remove(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "parts", f".part-00009.parquet.tmp-{uuid.uuid4().hex}"), "wb") as f:
        f.write(b"half a part")  # the part being written when the job was killed
    # Readers of the parts folder never see it: a half-written part is a hidden file.
    assert content(output_rows(out)) == before
    manifest, _ = generate_job(src, "output.rows_per_part=10", output=out)
    assert manifest["counts"]["rows_resumed"] == 50 and manifest["counts"]["rows_generated"] == 0
    assert content(output_rows(out)) == before
    assert not [f for f in os.listdir(os.path.join(out, "parts")) if ".tmp-" in f]


def generation_actor_pids() -> list[int]:
    """Ray titles an actor's process after its class: ray::MapWorker(MapBatches(GenerationWorker))."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"GenerationWorker" in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def kill_engines_once_parts_appear(out) -> tuple[threading.Thread, list[int]]:
    """A started thread that SIGKILLs an engine worker of the job as soon as a part is in
    <out>/parts (within 300 s), and the list of the pids it killed."""
    killed: list[int] = []

    def kill():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            parts = os.path.join(out, "parts")
            if os.path.isdir(parts) and any(f.startswith("part-") for f in os.listdir(parts)):
                for pid in generation_actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer, killed


def test_worker_killed_mid_job_is_replaced_without_duplicates(generate_job, ray_session, tmp_path):
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(requests(400, max_tokens=30)), src, row_group_size=50)
    _, ref_out = generate_job(src, output=str(tmp_path / "reference"))
    out = str(tmp_path / "out")
    killer, killed = kill_engines_once_parts_appear(out)
    manifest, _ = generate_job(src, "output.rows_per_part=20", "batch_size=20", output=out)
    killer.join()
    assert killed, "no worker was killed: the test did not exercise the fault"
    rows = output_rows(out)
    assert len(rows) == len({r["id"] for r in rows}) == 400
    assert content(rows) == content(output_rows(ref_out))
    assert manifest["counts"]["rows_out"] == 400


def test_engine_that_cannot_start_fails_the_job_with_the_reason(generate_job, tmp_path):
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(requests(5)), src)
    with pytest.raises(ConfigError, match="is not a model folder"):
        generate_job(src, "model.build=null", f"model.path={tmp_path / 'no-model'}")
    started = time.time()
    with pytest.raises(Exception) as info:
        generate_job(src, "engine.kv_cache_gib=0.000001", output=str(tmp_path / "oom"))
    assert "vLLM engine could not start" in str(info.value)
    assert time.time() - started < 300


def test_row_that_makes_the_engine_raise_becomes_an_error_row(tiny_model_dir):
    """A real engine; one row carries sampling parameters vLLM rejects (never produced by the
    job's own mapping: it stands for any request the engine refuses)."""
    from pipeline.generate.engine import GenerationWorker

    worker = GenerationWorker(
        engine={"dtype": "float32", "max_model_len": 256, "kv_cache_gib": 0.05, "seed": 0},
        model_path=str(tiny_model_dir), adapters={}, passthrough=[],
    )
    good = json.dumps({"max_tokens": 4, "temperature": 0.0, "seed": 1})
    bad = json.dumps({"max_tokens": 4, "temperature": 3.0, "seed": 1})
    batch = pa.table({
        "_id": ["a", "b", "c"], "_error": pa.nulls(3, pa.string()),
        "_prompt_token_ids": pa.array([[2048, 5, 6], [2048, 7, 8], [2048, 9, 10]], pa.list_(pa.int32())),
        "_params": [good, bad, good], "_lora": pa.nulls(3, pa.string()), "_tools": pa.array([[], [], []], pa.list_(pa.string())),
        "_seed": [1, 1, 1], "_source": ["f"] * 3, "_row": [0, 1, 2],
    })
    rows = worker(batch).to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["error"] is None and rows[0]["completion_tokens"] == 4
    assert rows[2]["error"] is None and rows[2]["completion_tokens"] == 4
    assert rows[1]["error"].startswith("engine error: ") and "temperature" in rows[1]["error"]
    # The worker's loop built the real engine on its own thread, the one that steps it.
    assert worker.loop.built.is_set() and worker.loop.build_error is None and worker.llm is worker.loop.llm


def test_bad_files_have_defined_behaviour(generate_job, tmp_path):
    from pipeline.generate.planning import InputError

    folder = tmp_path / "in"
    folder.mkdir()
    # Same fields, different physical types: nested messages in one file, JSON text in another.
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    pq.write_table(pa.table({"messages": pa.array([[{"role": "user", "content": "hi"}]], pa.list_(message))}),
                   folder / "nested.parquet")
    pq.write_table(pa.table({"messages": [json.dumps([{"role": "user", "content": "hi"}])]}), folder / "text.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), folder / "empty.parquet")  # no rows: nothing to do
    manifest, out = generate_job(str(folder), "seed=3")
    rows = {r["id"]: r for r in output_rows(out)}
    assert sorted(rows) == ["nested.parquet#0", "text.parquet#0"]
    assert all(r["error"] is None for r in rows.values())

    # Duplicate ids in the id column: refused up front, naming them.
    pq.write_table(pa.table({"uid": ["x", "y"], "prompt": ["a", "b"]}), tmp_path / "d1.parquet")
    pq.write_table(pa.table({"uid": ["y"], "prompt": ["c"]}), tmp_path / "d2.parquet")
    with pytest.raises(InputError, match=r"1 duplicate id\(s\): 'y' \(d1.parquet and d2.parquet\)"):
        generate_job(f"[{tmp_path / 'd1.parquet'},{tmp_path / 'd2.parquet'}]", "id_column=uid")


def test_damaged_data_pages_become_error_rows(generate_job, tmp_path):
    path = tmp_path / "damaged.parquet"
    table = pa.table({"prompt": [f"prompt number {i} " * 20 for i in range(300)], "max_tokens": [3] * 300})
    pq.write_table(table, path, row_group_size=100, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(1).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 40 : start + column.total_compressed_size - 40] = os.urandom(column.total_compressed_size - 80)
    path.write_bytes(bytes(data))  # row group 1's pages are garbage; the footer is intact

    manifest, out = generate_job(str(path), "read.rows_per_shard=100")
    rows = {r["id"]: r for r in output_rows(out)}
    assert len(rows) == 300
    bad = sorted(int(k.split("#")[1]) for k, r in rows.items() if r["error"])
    assert bad == list(range(100, 200))
    assert rows["damaged.parquet#150"]["error"].startswith("unreadable input: rows 100-199 of damaged.parquet")
    assert manifest["counts"]["errors"] == 100
