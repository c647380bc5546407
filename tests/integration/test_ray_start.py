"""The Ray a job starts for itself (`ray.address: null`): its settings reach every worker through
the environment Ray starts with, with no runtime environment, so Ray's idle workers take the job's
tasks and actors; the driver's own environment is left as it was, and Ray Data is imported once
Ray is up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys
import ray
from pipeline.generate.ray_session import start_ray
from pipeline.generate.settings import RaySettings

imported_before = "ray.data" in sys.modules
start_ray(RaySettings(num_cpus=1, env={"PIPELINE_PROBE": "on"}))
imported_after = "ray.data" in sys.modules

@ray.remote(num_cpus=0)
def task():
    return os.environ.get("PIPELINE_PROBE"), os.environ.get("TOKENIZERS_PARALLELISM")

@ray.remote(num_cpus=0)
class Actor:
    def probe(self):
        return os.environ.get("PIPELINE_PROBE")

out = {
    "driver_after": os.environ.get("PIPELINE_PROBE"),
    "task": ray.get(task.remote()),
    "actor": ray.get(Actor.remote().probe.remote()),
    "runtime_env": ray.get_runtime_context().runtime_env,
    "imported": [imported_before, imported_after],
    "progress_bars": ray.data.DataContext.get_current().enable_progress_bars,
}
ray.shutdown()
print(json.dumps(out))
"""


def test_a_ray_the_job_starts_hands_its_settings_to_every_worker_through_the_environment():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["task"] == ["on", "false"]  # ray.env, and the job's own TOKENIZERS_PARALLELISM
    assert out["actor"] == "on"
    assert out["driver_after"] is None  # set only while Ray started
    assert not out["runtime_env"].get("env_vars")  # none: idle workers can take the job's work
    # Ray Data is imported once Ray is up, not before (ray.init has loaded much of it by then).
    assert out["imported"] == [False, True]
    assert out["progress_bars"] is False
