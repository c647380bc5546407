"""Running counts of a generation job, its progress bar and its closing summary. Pure."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class RunStats:
    total_rows: int
    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_parse: dict = field(default_factory=dict)
    finish_reasons: dict = field(default_factory=dict)
    # What an earlier, interrupted run of the same job committed: counted in the totals, not in
    # this run's speed.
    resumed_rows: int = 0
    resumed_completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_row_s: float | None = None

    def add(self, batch: pa.Table, resumed: bool = False) -> None:
        completion = int(pc.sum(batch.column("completion_tokens")).as_py() or 0)
        if resumed:
            self.resumed_rows += batch.num_rows
            self.resumed_completion_tokens += completion
        elif self.first_row_s is None and batch.num_rows:
            self.first_row_s = time.perf_counter() - self.started
        self.rows += batch.num_rows
        self.errors += batch.num_rows - batch.column("error").null_count
        self.prompt_tokens += int(pc.sum(batch.column("prompt_tokens")).as_py() or 0)
        self.completion_tokens += completion
        for name, target in (("tool_parse", self.tool_parse), ("finish_reason", self.finish_reasons)):
            for value in batch.column(name).to_pylist():
                if value is not None:
                    target[value] = target.get(value, 0) + 1

    def counts(self) -> dict:
        return {
            "rows_in": self.total_rows,
            "rows_out": self.rows,
            "ok": self.rows - self.errors,
            "errors": self.errors,
            "rows_resumed": self.resumed_rows,
            "rows_generated": self.rows - self.resumed_rows,
            "finish_reasons": dict(sorted(self.finish_reasons.items())),
            "tool_parse": dict(sorted(self.tool_parse.items())),
        }

    def tokens(self) -> dict:
        return {"prompt": self.prompt_tokens, "completion": self.completion_tokens}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def throughput(self, seconds: float) -> dict:
        """This run's speed (rows and tokens resumed from an earlier run are left out)."""
        seconds = max(seconds, 1e-9)
        return {
            "rows_per_s": round((self.rows - self.resumed_rows) / seconds, 3),
            "output_tokens_per_s": round((self.completion_tokens - self.resumed_completion_tokens) / seconds, 3),
            "time_to_first_row_s": None if self.first_row_s is None else round(self.first_row_s, 3),
        }

    def postfix(self) -> str:
        rate = (self.completion_tokens - self.resumed_completion_tokens) / max(self.elapsed(), 1e-9)
        return f"{rate:,.0f} tok/s, {self.errors} errors"

    @contextlib.contextmanager
    def progress(self, enabled: bool = True):
        from tqdm import tqdm

        bar = tqdm(
            total=self.total_rows, initial=self.rows, unit="row", desc="generate", disable=not enabled, dynamic_ncols=True
        )

        class _Progress:
            def update(_, stats: "RunStats") -> None:
                bar.update(stats.rows - bar.n)
                bar.set_postfix_str(stats.postfix(), refresh=False)

        try:
            yield _Progress()
        finally:
            bar.close()

    def summary(self, output: str) -> str:
        seconds = self.elapsed()
        resumed = f", {self.resumed_rows} of them committed by an earlier run" if self.resumed_rows else ""
        return (
            f"done: {self.rows} of {self.total_rows} rows ({self.rows - self.errors} ok, {self.errors} errors{resumed}) "
            f"in {seconds:.1f}s; {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
            f"{(self.completion_tokens - self.resumed_completion_tokens) / max(seconds, 1e-9):,.0f} output tok/s -> {output}"
        )
