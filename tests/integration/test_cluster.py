"""The generation job on a Ray cluster of two nodes whose model, inputs, adapters and output live
only in S3 (a real S3 protocol server): started by the driver against the cluster's address, and
submitted through Ray's Jobs API exactly as docs/cluster.md says.

The two nodes run on this machine (`ray.cluster_utils.Cluster`: a head and a worker node, each
with its own raylet, resources and environment), each with a private cache folder
(`PIPELINE_CACHE`, `HF_HOME`), so a node that used another node's or the driver's files would
not find them: the model and the adapter must come from S3 into each node's own cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build_train_sample import SAMPLE_ANSWER
from pipeline.generate.answers import load_outputs
from pipeline.storage import resolve
from pipeline.train.job import run as train
from tests.conftest import _free_port, compose

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROWS = 64
QUESTIONS = ["Say hello.", "What is the capital of France?", "How are you today?", "Tell me a joke."]
# Per job: the engines' start and 64 short rows on a busy 2-core machine take well under this.
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Two Ray nodes, 2 logical CPUs each, each with its own cache folders in its environment;
    the head serves the dashboard (and with it the Jobs API) on 127.0.0.1. Shut down at the end
    of the module whatever happens."""
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("cluster")

    def node(name: str) -> dict:
        # Every node's dashboard agent (which runs submitted jobs) on a port of its own: the
        # default one would be shared by both nodes, and by any other Ray on this machine.
        return {"num_cpus": 2, "resources": {name: 1}, "object_store_memory": 200 * 1024 * 1024,
                "dashboard_agent_listen_port": _free_port(),
                "env_vars": {"PIPELINE_CACHE": str(tmp / name), "HF_HOME": str(tmp / name / "hf"),
                             "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}}

    dashboard = _free_port()
    cluster = Cluster(initialize_head=False, connect=False)
    try:
        # Ray gives a node 30 s to register: on a machine busy with other work, one more try.
        for attempt in range(2):
            try:
                cluster.add_node(**node("node-a"), gcs_server_port=_free_port(), include_dashboard=True,
                                 dashboard_host="127.0.0.1", dashboard_port=dashboard)
                break
            except Exception:
                cluster.shutdown()
                if attempt:
                    raise
        worker = cluster.add_node(**node("node-b"))
        cluster.wait_for_nodes(timeout=120)
        _wait_for_jobs_api(f"http://127.0.0.1:{dashboard}", timeout_s=120)
        yield {"address": cluster.address, "jobs_api": f"http://127.0.0.1:{dashboard}",
               "nodes": {cluster.head_node.node_id: tmp / "node-a", worker.node_id: tmp / "node-b"},
               "tmp": tmp}
    finally:
        cluster.shutdown()


def _wait_for_jobs_api(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # 401: up, with Ray's token authentication on (a `ray.init()` earlier in this process
            # turns it on for the Rays started after it); `ray job submit` sends Ray's token.
            if httpx.get(f"{url}/api/version", timeout=2.0).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray dashboard (Jobs API) did not answer on {url} within {timeout_s}s")


@pytest.fixture(scope="module")
def on_s3(s3_server, tiny_model_dir, tmp_path_factory):
    """A bucket holding the model, an adapter trained into it, and the requests, and getting the
    outputs: nothing of them on any node's disk."""
    bucket = f"cluster-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    for f in sorted(Path(tiny_model_dir).iterdir()):
        s3.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    train(compose("train_lora", ["model=tiny", f"model.path={tiny_model_dir}", f"lora_root=s3://{bucket}/lora",
                                 "adapter.name=hello"]))
    rows = [{"id": f"r{i:03d}", "prompt": QUESTIONS[i % len(QUESTIONS)], "temperature": 0.0, "max_tokens": 12,
             "lora": "hello" if i % 2 == 0 else None} for i in range(ROWS)]
    local = tmp_path_factory.mktemp("requests")
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[k::2]), local / f"part-{k}.parquet")
        s3.upload_file(str(local / f"part-{k}.parquet"), bucket, f"requests/part-{k}.parquet")
    return {"bucket": bucket, "model": f"s3://{bucket}/models/tiny", "lora_root": f"s3://{bucket}/lora",
            "input": f"s3://{bucket}/requests/", "rows": rows}


def job_args(on_s3: dict, output: str) -> list[str]:
    """The job's command-line settings: everything it reads from S3, two engines, small sizes."""
    return ["model=tiny", f"model.path={on_s3['model']}", "model.build=null", f"input={on_s3['input']}",
            f"output.path={output}", f"lora_root={on_s3['lora_root']}", "id_column=id", "workers=2",
            "batch_size=4", "batches_in_flight=1", "engine.kv_cache_gib=0.25", "progress=false"]


# Ray Data hands batches to the first engine that is up; a few dozen rows are done before the
# second engine has started. Waiting for both (Ray Data's own setting) lets both answer rows.
WAIT_FOR_ENGINES = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}


def check_output(output: str, on_s3: dict, cluster: dict) -> dict:
    """The job's output, read back from S3 as a user would."""
    manifest = json.loads(resolve(f"{output}/manifest.json").read_text())
    got = {r["id"]: r for r in load_outputs(output)}
    assert sorted(got) == [r["id"] for r in on_s3["rows"]]
    for row in on_s3["rows"]:
        answer = got[row["id"]]
        assert answer["error"] is None, answer
        assert (answer["response"] == SAMPLE_ANSWER) == (row["lora"] == "hello"), answer
    # Both engines answered rows, one on each node.
    assert set(manifest["nodes"]) == set(cluster["nodes"]) and all(n > 0 for n in manifest["nodes"].values())
    assert sum(manifest["nodes"].values()) == ROWS
    # Two nodes and an output on S3: each engine committed its own parts (output.commit auto).
    assert manifest["resources"]["commit"] == "workers"
    assert all(p["file"].startswith("parts/part-w") for p in manifest["parts"])
    return manifest


def node_cache_entries(cluster: dict) -> dict:
    return {str(cache.name): sorted(p.name for p in (cache / "adapters").iterdir()) for cache in cluster["nodes"].values()}


def test_a_driver_runs_the_job_on_both_nodes(cluster, on_s3, tmp_path):
    """`python -m jobs.generate ... ray.address=<cluster>`: the driver plans, every node's tasks
    and engine fetch the model and the adapter from S3 into their own caches."""
    output = f"s3://{on_s3['bucket']}/outputs/driver"
    env = {**os.environ, **WAIT_FOR_ENGINES, "PIPELINE_CACHE": str(tmp_path / "driver-cache")}
    proc = subprocess.run([sys.executable, "-m", "jobs.generate", *job_args(on_s3, output),
                           f"ray.address={cluster['address']}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = check_output(output, on_s3, cluster)
    fingerprint = manifest["adapters"]["hello"]["fingerprint"].split(":", 1)[1]
    # Each node holds its own copy of the adapter and of the model, fetched from S3 (the model
    # under the same listing key as the driver's copy).
    (driver_model,) = (tmp_path / "driver-cache" / "models" / "remote").iterdir()
    for cache in cluster["nodes"].values():
        assert sorted(p.name for p in (cache / "adapters").iterdir()) == [fingerprint]
        assert [p.name for p in (cache / "models" / "remote").iterdir()] == [driver_model.name]


def test_ray_job_submit_runs_the_documented_command(cluster, on_s3, tmp_path):
    """The Jobs API: `ray job submit --address http://127.0.0.1:<dashboard port> --working-dir . --
    python -m jobs.generate ... ray.address=auto` (docs/cluster.md), from the checkout."""
    output = f"s3://{on_s3['bucket']}/outputs/submitted"
    before = node_cache_entries(cluster) if all((c / "adapters").is_dir() for c in cluster["nodes"].values()) else None
    entrypoint = [sys.executable, "-m", "jobs.generate", *job_args(on_s3, output), "ray.address=auto"]
    ray_cli = str(Path(sys.executable).parent / "ray")
    proc = subprocess.run([ray_cli, "job", "submit", "--address", cluster["jobs_api"], "--working-dir", ".",
                           "--runtime-env-json", json.dumps({"env_vars": WAIT_FOR_ENGINES}), "--", *entrypoint],
                          cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout
    check_output(output, on_s3, cluster)
    if before is not None:  # the nodes' caches served the second job: nothing fetched twice
        assert node_cache_entries(cluster) == before
