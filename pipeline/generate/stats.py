"""Running counts of a generation job, its progress bar and its closing summary. Pure."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


# Points of the throughput timeline kept in the manifest (a long job keeps every other one).
TIMELINE_POINTS = 1000
# The first batch arrives after the engines started; the rate from then on is the job's speed,
# once it spans enough time not to be a burst of batches that finished together.
STEADY_AFTER_S = 10.0


# Schema metadata an engine puts on each batch it answers: the Ray node it runs on. The driver
# counts rows per node (`RunStats.nodes`, the manifest's `nodes`) and takes the tag off.
NODE_METADATA = b"pipeline.node"


def tag_node(table: pa.Table, node: str) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), NODE_METADATA: node.encode()})


def untag_node(table: pa.Table) -> tuple[pa.Table, str | None]:
    """(the table without the engine's node tag, the node)."""
    metadata = dict(table.schema.metadata or {})
    node = metadata.pop(NODE_METADATA, None)
    if node is None:
        return table, None
    return table.replace_schema_metadata(metadata or None), node.decode()


def batch_counts(batch: pa.Table) -> dict:
    """What `RunStats` counts of a batch of output rows, as plain data: rows, errors, tokens,
    tool-call parses and finish reasons."""
    counts: dict = {
        "rows": batch.num_rows,
        "errors": batch.num_rows - batch.column("error").null_count,
        "prompt_tokens": int(pc.sum(batch.column("prompt_tokens")).as_py() or 0),
        "completion_tokens": int(pc.sum(batch.column("completion_tokens")).as_py() or 0),
    }
    if "cached_tokens" in batch.column_names:
        counts["cached_tokens"] = int(pc.sum(batch.column("cached_tokens")).as_py() or 0)
    for name, column in (("tool_parse", "tool_parse"), ("finish_reasons", "finish_reason")):
        found: dict = {}
        for value in batch.column(column).to_pylist():
            if value is not None:
                found[value] = found.get(value, 0) + 1
        counts[name] = found
    return counts


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
    # (seconds since `started`, rows, completion tokens) of this run after each committed batch:
    # the report's throughput over time, and the progress bar's rate after the first batch.
    timeline: list = field(default_factory=list)
    # Rows this run's engines answered, per Ray node id.
    nodes: dict = field(default_factory=dict)
    # This run's prompt tokens and those its engines' prefix caches held already, per Ray node id.
    prefix_tokens: dict = field(default_factory=dict)

    def add(self, batch: pa.Table, resumed: bool = False, node: str | None = None) -> None:
        self.add_counts(batch_counts(batch), resumed=resumed, node=node)

    def add_counts(self, counts: dict, resumed: bool = False, node: str | None = None) -> None:
        """Count a batch by its `batch_counts` (all a worker-committed part's ledger entry carries)."""
        rows, completion = counts["rows"], counts["completion_tokens"]
        if node is not None:
            self.nodes[node] = self.nodes.get(node, 0) + rows
        if not resumed:
            cached = self.prefix_tokens.setdefault(node, [0, 0])
            cached[0] += counts["prompt_tokens"]
            cached[1] += counts.get("cached_tokens", 0)
        if resumed:
            self.resumed_rows += rows
            self.resumed_completion_tokens += completion
        elif self.first_row_s is None and rows:
            self.first_row_s = time.perf_counter() - self.started
        self.rows += rows
        self.errors += counts["errors"]
        self.prompt_tokens += counts["prompt_tokens"]
        self.completion_tokens += completion
        for name, target in (("tool_parse", self.tool_parse), ("finish_reasons", self.finish_reasons)):
            for value, count in counts[name].items():
                target[value] = target.get(value, 0) + count
        if not resumed and rows:
            self._record()

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

    def prefix_cache(self) -> dict:
        """How much of this run's prompt tokens the engines' prefix caches held already (vLLM's
        per-request `num_cached_tokens`): in all, and per Ray node id."""
        def figures(prompt: int, cached: int) -> dict:
            return {"prompt_tokens": prompt, "cached_tokens": cached,
                    "hit_rate": round(cached / prompt, 4) if prompt else None}

        prompt = sum(p for p, _ in self.prefix_tokens.values())
        cached = sum(c for _, c in self.prefix_tokens.values())
        by_node = {node: figures(*pc) for node, pc in sorted(self.prefix_tokens.items()) if node is not None}
        return {**figures(prompt, cached), "by_node": by_node}

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

    def _record(self) -> None:
        rows, tokens = self.rows - self.resumed_rows, self.completion_tokens - self.resumed_completion_tokens
        self.timeline.append((round(self.elapsed(), 3), rows, tokens))
        if len(self.timeline) > 2 * TIMELINE_POINTS:  # a long job: keep every other point, and the last
            self.timeline = self.timeline[:-1:2] + self.timeline[-1:]

    def rates(self) -> tuple[float, float] | None:
        """(rows/s, output tokens/s) of this run: since its first batch arrived (the speed once
        the engines are up) when that is `STEADY_AFTER_S` ago, else since it began; None before
        any row."""
        if not self.timeline:
            return None
        now = self.elapsed()
        t0, rows0, tokens0 = self.timeline[0]
        _, rows, tokens = self.timeline[-1]
        if now - t0 >= STEADY_AFTER_S and rows > rows0:
            return (rows - rows0) / (now - t0), (tokens - tokens0) / (now - t0)
        return rows / max(now, 1e-9), tokens / max(now, 1e-9)

    def postfix(self) -> str:
        rates = self.rates()
        if rates is None:
            return "waiting for the first batch (engines starting)"
        rows_s, tokens_s = rates
        eta = f"ETA {_clock((self.total_rows - self.rows) / rows_s)}" if rows_s > 0 else "ETA ?"
        return f"{rows_s:,.1f} rows/s, {tokens_s:,.0f} tok/s, {eta}, {self.errors} errors"

    @contextlib.contextmanager
    def progress(self, enabled: bool = True, file=None):
        """A progress bar that redraws on every committed batch (`update`), and once a second
        on a terminal so that the clock and the ETA move while a batch is being generated."""
        from tqdm import tqdm

        bar = tqdm(
            total=self.total_rows, initial=self.rows, desc="generate", disable=not enabled, dynamic_ncols=True,
            file=file, mininterval=0, miniters=1,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows [{elapsed}{postfix}]",
        )
        bar.set_postfix_str(self.postfix(), refresh=True)
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(1.0):
                bar.set_postfix_str(self.postfix(), refresh=True)

        ticker = None
        stream = bar.fp if enabled else None
        if stream is not None and getattr(stream, "isatty", lambda: False)():
            ticker = threading.Thread(target=tick, name="progress-tick", daemon=True)
            ticker.start()

        class _Progress:
            def update(_, stats: "RunStats") -> None:
                bar.set_postfix_str(stats.postfix(), refresh=False)
                bar.update(stats.rows - bar.n)

        try:
            yield _Progress()
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            bar.close()

    def summary(self, output: str) -> str:
        seconds = self.elapsed()
        resumed = f", {self.resumed_rows} of them committed by an earlier run" if self.resumed_rows else ""
        return (
            f"done: {self.rows} of {self.total_rows} rows ({self.rows - self.errors} ok, {self.errors} errors{resumed}) "
            f"in {seconds:.1f}s; {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
            f"{(self.completion_tokens - self.resumed_completion_tokens) / max(seconds, 1e-9):,.0f} output tok/s -> {output}"
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
