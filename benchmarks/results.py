"""What one run of a contender measured, and how runs are compared.

A contender returns a `RunResult` (generation) or a `TrainResult` (training); `to_dict()` is its
row in the results JSON, in which a figure the contender does not have is left out rather than
written as null. Comparisons are ratios taken within one repeat and summarised by their median:
the machine is usually shared, so absolute figures drift between runs, while contenders that run
back to back drift together.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

# Figures every generation run has, written even when unknown (a run that returned no row has
# no time to its first row).
ALWAYS = ("name", "rows", "output_tokens", "wall_s", "rows_per_s", "output_tokens_per_s", "time_to_first_row_s")


@dataclass(frozen=True)
class Memory:
    """What the benchmark's process tree used during one run (see `benchmarks.memory`)."""

    cpu_s: dict
    """CPU seconds by kind of process (the driver, Ray's daemons, an engine actor), largest first."""
    cpu_share_of_cores: float
    """The CPU seconds over the run's wall time and all of the machine's cores."""
    peak_rss_gib: float
    rise_rss_gib: float
    """The peak over the tree's size when the run began."""
    peak_pss_gib: float
    rise_pss_gib: float
    peak_processes: int
    peak_rss_by_kind_gib: dict = field(default_factory=dict)
    """Each group of processes' own peak RSS (`benchmarks.memory.memory_group`: the driver, the
    engine actors, Ray's workers, the raylet, Ray's other daemons), summed over the group's
    processes at one moment; groups peak at different moments, so these add up to more than the
    tree's peak."""
    peak_pss_by_kind_gib: dict = field(default_factory=dict)
    """The same in PSS (sampled less often): shared pages split between the processes that map
    them, so a fork of a big process does not count twice."""


@dataclass
class RunResult:
    """One generation run: a contender on the benchmark's rows, start-up included."""

    name: str
    rows: int
    output_tokens: int
    wall_s: float
    memory: Memory
    prompt_tokens: int | None = None
    time_to_first_row_s: float | None = None
    rep: int | None = None
    """The repeat (from 1) of a comparison that runs its contenders several times."""
    phase: str | None = None
    """The contender's kind in the main comparison: bare, job or raydata."""
    engine_start_s: float | None = None
    """Bare vLLM: from `LLM(...)` to a ready engine."""
    generate_s: float | None = None
    """Bare vLLM: the `generate()` call alone."""
    vllm_import_s: float | None = None
    """Bare vLLM: importing vLLM in a fresh interpreter, included in `wall_s`."""
    startup_s: float | None = None
    """What the contender takes before generating: bare vLLM's import and engine start, or the
    wall time of a one-row run (`--startup-runs`)."""
    output_batches: int | None = None
    """Batches of output rows the contender's driver received."""
    settings: dict | None = None
    """The job's settings that shape its throughput (workers, batch size, engine sizes)."""
    compared: dict = field(default_factory=dict)
    """Figures relative to other contenders of the same repeat, written as they are (null
    included): same_text_as_bare, over_bare, over_raydata."""
    cached_tokens: int | None = None
    """Prompt tokens the engine found in its prefix cache (not prefilled again)."""
    engine_threads: int | None = None
    """Bare vLLM: the threads its engine computed with (torch's)."""
    running_output_tokens_per_s: float | None = None
    """The job: output tokens/s from its first committed batch to its last (the manifest's
    timeline), its engines' rate once they answer rows, with no start-up or shutdown on it: what
    compares with bare vLLM's `generate()` alone."""
    texts: dict = field(default_factory=dict, repr=False)
    """Row id -> generated text: compared between contenders, never written."""

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """The share of prompt tokens the engine found in its prefix cache."""
        return round(self.cached_tokens / self.prompt_tokens, 4) if self.cached_tokens is not None and self.prompt_tokens else None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def engine_output_tokens_per_s(self) -> float | None:
        """The engine's rate once started: the ceiling of every contender."""
        return self.output_tokens / self.generate_s if self.generate_s else None

    def to_dict(self) -> dict:
        figures = {
            "name": self.name,
            "phase": self.phase,
            "rep": self.rep,
            "rows": self.rows,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "wall_s": rounded(self.wall_s, 2),
            "rows_per_s": rounded(self.rows_per_s, 2),
            "output_tokens_per_s": rounded(self.output_tokens_per_s, 1),
            "engine_output_tokens_per_s": rounded(self.engine_output_tokens_per_s, 1),
            "running_output_tokens_per_s": rounded(self.running_output_tokens_per_s, 1),
            "engine_threads": self.engine_threads,
            "time_to_first_row_s": rounded(self.time_to_first_row_s, 2),
            "engine_start_s": rounded(self.engine_start_s, 2),
            "generate_s": rounded(self.generate_s, 2),
            "vllm_import_s": rounded(self.vllm_import_s, 2),
            "startup_s": rounded(self.startup_s, 2),
            "output_batches": self.output_batches,
            "cached_tokens": self.cached_tokens,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
            "settings": self.settings,
        }
        kept = {k: v for k, v in figures.items() if v is not None or k in ALWAYS}
        return {**kept, **dataclasses.asdict(self.memory), **self.compared}


@dataclass
class TrainResult:
    """One training run: a trainer on the benchmark's conversations."""

    name: str
    steps: int
    train_tokens: int
    train_s: float
    """The training loop alone: no model loading, no saving."""
    memory: Memory
    rep: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_s

    def to_dict(self) -> dict:
        return {"name": self.name, "rep": self.rep, "steps": self.steps, "train_tokens": self.train_tokens,
                "train_s": round(self.train_s, 3), "tokens_per_s": round(self.tokens_per_s, 1),
                **dataclasses.asdict(self.memory)}


def rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to three places, or None where either is missing (or zero)."""
    return round(a / b, 3) if a and b else None


def median(xs) -> float | None:
    """The median of the figures that are there, to three places; None if none are."""
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def same_texts(a: dict, b: dict) -> float:
    """The share of the rows both runs answered whose texts are the same."""
    keys = set(a) & set(b)
    return round(sum(a[k] == b[k] for k in keys) / max(len(keys), 1), 3)


def per_repeat_ratios(runs: list, numerator: str, denominator: str, figure: str) -> list[float | None]:
    """`figure` of the run named `numerator` over that of the run named `denominator`, in each
    repeat (`rep`) that has both, in repeat order."""
    by_rep: dict[int, dict] = {}
    for r in runs:
        by_rep.setdefault(r.rep, {})[r.name] = r
    return [ratio(getattr(pair[numerator], figure), getattr(pair[denominator], figure))
            for _, pair in sorted(by_rep.items()) if numerator in pair and denominator in pair]
