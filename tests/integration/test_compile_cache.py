"""The CPU engine's compiled model is loaded from vLLM's compile cache on its next start rather than
compiled again (`pipeline.models.vllm_plugin.repair_compile_cache`), and runs the same.

One child process (its own, empty compile cache) starts the tiny model's engine twice: the first
start compiles and saves, the second must load what the first saved and generate the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import gc, json, sys
from vllm import LLM, SamplingParams
from vllm.compilation.counter import compilation_counter

runs = []
for start in range(2):
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 * 2**20,
              enable_chunked_prefill=False, seed=0)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5 + i]} for i in range(4)],
                       SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True), use_tqdm=False)
    runs.append({"tokens": [list(o.outputs[0].token_ids) for o in out],
                 "loaded": compilation_counter.num_aot_artifacts_loaded})
    del llm, out
    gc.collect()
print("RESULT " + json.dumps(runs))
"""


def test_second_engine_start_loads_the_compiled_model(tiny_model_dir, tmp_path):
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("PIPELINE_COMPILE_CACHE_REPAIR", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert first["loaded"] == 0 and second["loaded"] == 1, proc.stderr[-4000:]
    assert "due to a load failure" not in proc.stderr
    assert second["tokens"] == first["tokens"] and all(len(t) == 8 for t in first["tokens"])
