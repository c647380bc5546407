"""The endpoint as two Ray Serve replicas on the CPU (`serve.replicas=2`, the tiny model): started
by the real entry point as a subprocess, both replicas answer through Ray Serve's proxy on
127.0.0.1, give the same answer to the same seeded request, and stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_serve import ROUTE, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_two_replicas_both_answer_alike(tiny_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="120")
    cmd = [sys.executable, "-m", "jobs.serve", "model=tiny", f"model.path={tiny_model_dir}", f"port={port}",
           "engine.kv_cache_gib=0.25", "serve.replicas=2", "serve.num_cpus=0.5", "adapters=false",
           f"lora_root={tmp_path / 'lora'}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        served_by, answers = set(), set()
        request = {"prompt": "Which replica?", "max_tokens": 12, "seed": 4}
        while len(served_by) < 2:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{served_by} after 300 s:\n{log.read_text()[-4000:]}"
            try:
                res = httpx.post(base + ROUTE, json=request, timeout=30)
            except httpx.TransportError:
                time.sleep(1)
                continue
            if res.status_code != 200:  # the proxy answers before the replicas are up
                time.sleep(1)
                continue
            served_by.add(res.headers["x-served-by"])
            answers.add(res.json()["result"]["response"])
        assert all(s.startswith("replica-") for s in served_by)
        assert len(answers) == 1  # the same seeded request, the same answer, whichever replica
        print(f"\nreplicas that answered: {sorted(served_by)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
