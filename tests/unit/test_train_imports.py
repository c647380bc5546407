"""The pure parts of training (settings, data, labels) load no torch, PEFT, transformers, Ray or
vLLM, so they test in milliseconds. (Which module may import which framework at all is
`test_import_rules.py`'s.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "peft", "transformers", "ray", "vllm", "datasets")


def test_pure_training_modules_import_nothing_heavy():
    code = (
        "import json, sys\n"
        "import pipeline.train.settings, pipeline.train.data, pipeline.train.labels\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
