"""What a person sees of a job: the terminal of a real `python -m jobs.generate` run on the tiny
model (short by default, the rest in the log file, a progress bar that moves with each committed
part), and the report pages of that run and of a real training run, opened in headless Chromium.

The browser is the system's Chromium (Debian's `chromium` package, which scripts/test.sh
installs), driven by Playwright; the screenshots are kept in test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.train.job import run as train
from tests.conftest import compose
from tests.integration.browser import ARTIFACTS, SCRIPT, launch_chromium

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROWS, BATCH = 40, 8
# Start line, progress bar, summary (3 lines): what the default terminal shows, with room for a
# warning or two; the baseline before the quiet console was over a hundred lines.
LINE_BUDGET = 12

TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                         "required": ["city"]}}]


def requests() -> list[dict]:
    rows = []
    for i in range(ROWS):
        row = {"uid": f"row-{i}", "prompt": f"Tell me about item {i}", "messages": None, "max_tokens": 4 + i % 13,
               "temperature": 0.0, "tools": None}
        if i == 3:  # a bad request whose id and text hold markup: it is shown as text, never run
            row.update(uid=f"row-3 {SCRIPT}", prompt=f"Say {SCRIPT}", temperature=7.5)
        if i % 10 == 5:  # tools go with messages (the schema's prompt mode has none)
            row.update(prompt=None, messages=json.dumps([{"role": "user", "content": f"Weather in city {i}?"}]),
                       tools=json.dumps(TOOLS))
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def generated(tiny_model_dir, tmp_path_factory):
    """One run of the real entry point with the default console: 40 rows in batches (and parts) of 8."""
    tmp = tmp_path_factory.mktemp("report_job")
    source = tmp / "requests.parquet"
    pq.write_table(pa.Table.from_pylist(requests()), source)
    out = tmp / "out"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.generate", "model=tiny", f"model.path={tiny_model_dir}", f"input={source}",
         f"output.path={out}", "engine.kv_cache_gib=0.25", "ray.num_cpus=2", "id_column=uid", "passthrough=[prompt]",
         f"batch_size={BATCH}", f"output.rows_per_part={BATCH}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr,
            "manifest": json.loads((out / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_train") / "lora"
    train(compose("train_lora", ["model=tiny", f"model.path={tiny_model_dir}", f"lora_root={root}",
                                 "adapter.name=bonjour", "train.epochs=2"]))
    return root / "bonjour"


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


def open_page(browser, path: Path, screenshot: str) -> dict:
    """Load the page from disk; what it asked for, what its console said, and the page."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    seen = {"requests": [], "console": [], "page_errors": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("console", lambda m: seen["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / screenshot
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    seen.update(page=page, title=page.title(), text=page.inner_text("body"),
                plots=page.locator("svg.plot").count(), scripts=page.locator("script").count())
    return seen


def test_the_default_console_is_short_and_the_log_file_holds_the_rest(generated):
    shown = generated["stdout"] + generated["stderr"]
    lines = [line for line in shown.splitlines() if line.strip()]
    assert len(lines) <= LINE_BUDGET, shown
    assert lines[0].startswith(f"generate: {ROWS} rows from 1 file(s)")
    assert f"done: {ROWS} of {ROWS} rows ({ROWS - 1} ok, 1 errors)" in shown
    out = generated["out"]
    assert f"report: {out / 'report.html'}" in shown and f"log: {out / 'logs' / 'generate.log'}" in shown
    assert "pid=" not in shown and '"engine":' not in shown  # no worker lines, no resolved settings
    log = (out / "logs" / "generate.log").read_text()
    assert '"engine": {' in log  # the resolved settings
    assert "Started a local Ray instance" in log  # Ray's own log lines
    assert re.search(r"pid=\d+.*LLM engine", log)  # the engine's lines, from its Ray worker
    assert len(log.splitlines()) > 10 * LINE_BUDGET


def test_the_progress_bar_advances_at_least_once_per_committed_part(generated):
    parts = generated["manifest"]["parts"]
    assert len(parts) == ROWS // BATCH  # batches of 8 committed as parts of 8
    drawn = [int(n) for n in re.findall(r"(\d+)/%d rows" % ROWS, generated["stderr"])]
    advances = sorted({n for n in drawn if n > 0})
    assert len(advances) >= len(parts), generated["stderr"]
    assert advances[-1] == ROWS and drawn == sorted(drawn)
    assert re.search(r"[\d.]+ rows/s, [\d,]+ tok/s, ETA \d\d:\d\d", generated["stderr"])


def test_the_generation_page_in_a_browser(generated, browser):
    out, manifest = generated["out"], generated["manifest"]
    assert manifest["timeline"]["points"][-1][1] == ROWS
    seen = open_page(browser, out / "report.html", "report-generate.png")
    assert seen["requests"] == [(out / "report.html").as_uri()]  # nothing fetched beyond the page
    assert seen["console"] == [] and seen["page_errors"] == []
    assert seen["scripts"] == 0 and seen["title"] == f"Generation report: {out.name}"  # the row's script never ran
    assert SCRIPT in seen["text"]  # shown as text
    # tokens (2), finish reasons, tool parsing, errors, throughput
    assert seen["plots"] >= 6
    for heading in ("Tokens", "How rows ended", "Errors", "Throughput over time", "Sample rows"):
        assert seen["page"].get_by_role("heading", name=heading).count() == 1
    assert f"{ROWS - 1}" in seen["text"] and "invalid request" in seen["text"]
    seen["page"].close()


def test_the_rebuilt_page_of_an_interrupted_job(generated, browser, tmp_path):
    """A job stopped after two parts: `python -m jobs.report` pages what was committed."""
    out = tmp_path / "stopped"
    shutil.copytree(generated["out"], out)
    (out / "manifest.json").unlink()
    for part in sorted((out / "parts").iterdir())[2:]:
        part.unlink()
    (out / "report.html").unlink()
    proc = subprocess.run([sys.executable, "-m", "jobs.report", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    seen = open_page(browser, out / "report.html", "report-interrupted.png")
    assert f"incomplete: {2 * BATCH} of {ROWS} rows committed" in seen["text"]
    assert seen["console"] == [] and seen["plots"] >= 4
    seen["page"].close()


def test_the_training_page_in_a_browser(trained, browser):
    manifest = json.loads((trained / "manifest.json").read_text())
    assert len(manifest["history"]["step"]) == manifest["steps"]
    answers = manifest["validation_answers"]
    assert answers and all(a["reference"] and a["answer"] is not None for a in answers)
    seen = open_page(browser, trained / "report.html", "report-train.png")
    assert seen["requests"] == [(trained / "report.html").as_uri()]
    assert seen["console"] == [] and seen["page_errors"] == [] and seen["scripts"] == 0
    assert seen["plots"] >= 2  # loss, speed
    assert "Validation answers" in seen["text"] and answers[0]["reference"].strip()[:20] in seen["text"]
    seen["page"].close()
