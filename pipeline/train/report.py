"""The training job's report: `report.html` in the adapter's registry folder, built from its
manifest: loss curve, tokens/s, data counts (rows used and skipped, and why), hyperparameters, and
a few validation conversations with the adapter's greedy answer beside the reference.

Pure module: stdlib and the shared page (`pipeline.report_html`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.lora_registry import MANIFEST
from pipeline.report_html import Section, Table, bar_chart, key_value_table, line_chart, render_page

REPORT = "report.html"
PROMPT_TAIL = 300


def write_report(adapter_dir: str | os.PathLike, manifest: dict | None = None) -> str:
    """Write `<adapter_dir>/report.html` from `manifest` (read from the folder when not given)."""
    folder = Path(adapter_dir)
    if manifest is None:
        manifest = read_manifest(folder)
    path = folder / REPORT
    tmp = folder / f".{REPORT}.tmp"
    tmp.write_text(build_report(manifest), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"'{path}' cannot be read ({exc}); give an adapter folder of the registry") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"'{path}' is not a JSON object; the adapter's manifest is damaged")
    return manifest


def build_report(m: dict) -> str:
    data = m.get("data") or {}
    base = m.get("base_model") or {}
    facts = [
        ("steps", m.get("steps")),
        ("epochs", m.get("epochs_run")),
        ("train tokens", m.get("train_tokens")),
        ("tokens/s", m.get("tokens_per_second")),
        ("training (s)", m.get("train_seconds")),
        ("wall time (s)", m.get("wall_seconds")),
        ("first step loss", m.get("first_step_loss")),
        ("final train loss", m.get("train_loss")),
        ("validation loss", m.get("validation_loss")),
    ]
    sections = [
        Section("Adapter", tables=[key_value_table((
            ("name", m.get("adapter")),
            ("base model", base.get("name")),
            ("base model path", base.get("path")),
            ("trained on", base.get("train_path")),
            ("created", m.get("created")),
            ("workers", m.get("workers")),
            ("trainable parameters", m.get("trainable_parameters")),
            ("prompt date", (m.get("prompt") or {}).get("date_string")),
            ("versions", m.get("versions")),
        ))]),
        _curves(m),
        _data_section(data),
        _answers_section(m.get("validation_answers")),
    ]
    return render_page(f"Training report: {m.get('adapter', '?')}", "complete", facts, sections, m.get("config"))


def _curves(m: dict) -> Section:
    history = m.get("history") or {}
    steps, loss = history.get("step") or [], history.get("loss") or []
    if not steps:
        return Section("Training", note="This adapter's manifest has no per-step history.")
    series = [("train loss (per step)", steps, loss)]
    evaluations = [e for e in m.get("evaluations") or [] if isinstance(e, dict) and e.get("loss") is not None]
    val = m.get("validation_loss")
    if evaluations:
        series.append(("validation loss", [e["step"] for e in evaluations], [e["loss"] for e in evaluations]))
        accuracy = [("validation token accuracy", [e["step"] for e in evaluations],
                     [e.get("accuracy") for e in evaluations])]
    elif val is not None:
        series.append(("validation loss (after training)", [steps[0], steps[-1]], [val, val]))
        accuracy = []
    else:
        accuracy = []
    kept = (m.get("kept") or {}).get("step")
    return Section(
        "Training",
        note="Loss per optimizer step over the assistant tokens, and the validation loss at each evaluation "
             "(train.eval_every) on the held-out conversations"
             + (f"; the adapter is the one of step {kept} (train.keep)." if kept else "."),
        plots=[p for p in (
            line_chart(series, "Loss", "step", "loss", markers=bool(evaluations)),
            line_chart(accuracy, "Validation token accuracy", "step", "share of assistant tokens",
                       markers=True) if accuracy else None,
            line_chart([("tokens/s (running)", steps, history.get("tokens_per_second") or [])], "Speed",
                       "step", "tokens/s", right=("learning rate", steps, history.get("lr") or [], "learning rate")),
        ) if p],
    )


def _data_section(data: dict) -> Section:
    skipped = data.get("skipped") or {}
    counts = [
        ("rows read", data.get("rows")),
        ("conversations", data.get("conversations")),
        ("training examples", data.get("train_examples")),
        ("validation examples", data.get("validation_examples")),
        ("skipped", sum(skipped.values()) if skipped else 0),
        *[(f"skipped: {reason}", n) for reason, n in sorted(skipped.items())],
        ("data", ", ".join(data.get("path") or [])),
        ("data fingerprint", data.get("fingerprint")),
    ]
    plots = [bar_chart(skipped, "Skipped rows and conversations, by reason")] if skipped else []
    return Section("Data", plots=plots, tables=[key_value_table(counts)])


def _answers_section(answers) -> Section:
    if not answers:
        return Section("Validation answers", note="No validation conversation (data.validation_fraction is 0 or "
                                                  "the data too small), so no greedy answers.")
    # The end of the rendered prompt is the question; the system header before it is the same each time.
    rows = [[_tail(a.get("prompt") or "", PROMPT_TAIL), a.get("reference"), a.get("answer")] for a in answers]
    return Section(
        "Validation answers",
        note="Held-out conversations up to their first assistant turn (the end of the rendered prompt), the "
             "reference answer from the data, and the adapter's greedy answer after the same prompt.",
        tables=[Table(["prompt", "reference", "adapter (greedy)"], rows,
                      text_columns=["prompt", "reference", "adapter (greedy)"])],
    )


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]
