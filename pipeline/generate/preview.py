"""`plan=true`: what a job would do, without an engine and without writing anything.

Every planned row (or the `limit` rows) is read, validated, rendered and tokenized exactly as
the job's prepare tasks would (the same `Preparer`), on this machine, and the result is
summed up: rows and answers, prompt tokens, the most output tokens the job may generate, the
rows that would fail with their errors, and a time estimate from the throughput the last
finished run into the same output folder measured, when there is one.

Pure module: pyarrow and the job's own reading and preparing code; no Ray, no vLLM.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from pipeline.generate.config import AdapterSet
from pipeline.generate.planning import ShardPlan
from pipeline.generate.settings import GenerationSettings
from pipeline.generate.sinks import MANIFEST, Resume
from pipeline.generate.tasks import preparer_for, read_shard, rows_to_skip

_EXAMPLES = 5


@dataclass
class PlanPreview:
    rows: int = 0
    answers: int = 0
    ok: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    max_output_tokens: int = 0
    errors: Counter = field(default_factory=Counter)  # stage -> rows
    examples: list[tuple[str, str]] = field(default_factory=list)  # (id, error)
    throughput: float | None = None  # output tokens/s measured by the last finished run here

    def record(self) -> dict:
        tokens = sorted(self.prompt_tokens)
        return {
            "rows": self.rows,
            "answers": self.answers,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "error_examples": [{"id": i, "error": e} for i, e in self.examples],
            "prompt_tokens": {
                "total": sum(tokens),
                "max": tokens[-1] if tokens else 0,
                "median": tokens[len(tokens) // 2] if tokens else 0,
            },
            "max_output_tokens": self.max_output_tokens,
            "estimate_s": round(self.max_output_tokens / self.throughput, 1) if self.throughput else None,
        }

    def text(self, output_path: str) -> str:
        r = self.record()
        lines = [
            f"plan: {r['rows']:,} rows -> {r['answers']:,} answers ({r['ok']:,} ready, "
            f"{r['answers'] - r['ok']:,} would be error rows); nothing was run or written",
            f"  prompt tokens: {r['prompt_tokens']['total']:,} in all, median {r['prompt_tokens']['median']:,}, "
            f"max {r['prompt_tokens']['max']:,} per row",
            f"  output tokens: at most {r['max_output_tokens']:,} (the answers' max_tokens, summed)",
        ]
        if r["estimate_s"] is not None:
            lines.append(f"  time: at most about {_duration(r['estimate_s'])} at the {self.throughput:,.0f} output "
                         f"tokens/s the last run into {output_path} measured")
        else:
            lines.append("  time: no estimate (no finished run in the output folder to measure throughput from)")
        for stage, count in r["errors"].items():
            lines.append(f"  {count:,} row(s) would fail at '{stage}'")
        for example in r["error_examples"]:
            lines.append(f"    {example['id']}: {example['error']}")
        return "\n".join(lines)


def preview(settings: GenerationSettings, plan: ShardPlan, selected: dict[str, list[int]] | None,
            model_path: str, adapters: AdapterSet, revision: str | None = None) -> PlanPreview:
    """The plan's rows prepared as the job would prepare them, summed up."""
    preparer = preparer_for(settings, model_path, adapters, revision)
    out = PlanPreview(throughput=_last_throughput(settings.output.path))
    nothing_done = Resume()
    for shard in plan.shards:
        skip = rows_to_skip(shard, nothing_done, selected)
        if len(skip) == shard.num_rows:
            continue
        for block in read_shard(shard, plan.id_column, (), {}, skip, settings.template):
            prepared = preparer.prepare_block(block)
            ids, errors = prepared.column("_id").to_pylist(), prepared.column("_error").to_pylist()
            prompts, params = prepared.column("_prompt_token_ids").to_pylist(), prepared.column("_params").to_pylist()
            for row_id, error, prompt, param in zip(ids, errors, prompts, params):
                out.rows += 1
                out.answers += settings.n
                if error is not None:
                    out.errors[error.split(":", 1)[0]] += settings.n
                    if len(out.examples) < _EXAMPLES:
                        out.examples.append((row_id, error))
                    continue
                out.ok += settings.n
                out.prompt_tokens.append(len(prompt))
                out.max_output_tokens += settings.n * int(json.loads(param)["max_tokens"])
    return out


def _last_throughput(output_path: str) -> float | None:
    from pipeline import storage

    try:
        value = json.loads(storage.resolve(output_path).join(MANIFEST).read_text())["throughput"]["output_tokens_per_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
