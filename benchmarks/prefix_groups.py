"""Rows grouped by shared prefix (`--phases prefix`): several short questions about each of many
long documents, shuffled, short answers (the common synthetic-data shape), with a KV cache too
small to hold every document at once.

In input order, a document is evicted from an engine's prefix cache long before the next
question about it comes, so it is prefilled again for nearly every row; the job groups each
prepared block's rows by prompt tokens (`prepare.group_prefixes`, `pipeline.generate.prefix_groups`)
so that a document's questions meet in the engine together. Four runs on the same rows: the job
with grouping on and off, and bare vLLM given the rows in input order and sorted the same way;
ratios within the run, and each run's prefix-cache hit rate (the share of prompt tokens the
engine found in its cache: the job's manifest, `RequestOutput.num_cached_tokens` for bare vLLM).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from benchmarks import bare_vllm
from benchmarks.job import run_job
from benchmarks.job_config import job_setup
from benchmarks.labelling import TOKENS_PER_WORD
from benchmarks.report import log
from benchmarks.results import RunResult, median, per_repeat_ratios, same_texts
from benchmarks.workload import WORDS, prepared_table, rotated, write_requests

NAME = "prefix"
JOB_ON, JOB_OFF = "job, grouped", "job, input order"
BARE_SORTED, BARE_INPUT = "bare vLLM, sorted", "bare vLLM, input order"


def make_document_requests(documents: int, questions: int, document_tokens: int, max_tokens: int,
                           seed: int) -> list[dict]:
    """`questions` short questions about each of `documents` documents of about `document_tokens`
    tokens (the document in the system message, the question in the user's), shuffled; greedy
    answers of at most `max_tokens` tokens."""
    rng = random.Random(f"documents-{seed}")
    rows = []
    for d in range(documents):
        text = " ".join(rng.choice(WORDS) for _ in range(max(1, int(document_tokens / TOKENS_PER_WORD))))
        system = f"Answer questions about this document in a few words.\nDocument {d}: {text}."
        for q in range(questions):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "?"
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            rows.append({"messages": json.dumps(messages), "max_tokens": max_tokens, "temperature": 0.0})
    rng.shuffle(rows)
    return rows


def prefix_comparison(args, model_path, workdir, mem, time_left) -> dict:
    """The four runs on `--prefix-documents` x `--prefix-questions` rows; the results' `prefix`."""
    from pipeline.generate.prefix_groups import group_by_prefix

    requests = make_document_requests(args.prefix_documents, args.prefix_questions, args.prefix_document_tokens,
                                      args.prefix_max_tokens, args.seed)
    input_path = write_requests(workdir / f"{NAME}.parquet", requests)
    setup = job_setup(args, model_path, input_path)
    engine_kwargs = setup.engine_kwargs(kv_cache_gib=args.prefix_kv_cache_gib)
    prepared = prepared_table(input_path, setup.settings, model_path)
    lengths = sorted(len(t) for t in prepared.column("_prompt_token_ids").to_pylist())
    per_token = kv_bytes_per_token(model_path, engine_kwargs["dtype"])
    kv_tokens = int(engine_kwargs["kv_cache_memory_bytes"] // per_token) if per_token else None
    log(f"{len(requests)} rows: {args.prefix_documents} documents x {args.prefix_questions} questions, prompt tokens "
        f"{lengths[0]}-{lengths[-1]}; KV cache {args.prefix_kv_cache_gib} GiB = about {kv_tokens} tokens")
    kv = f"engine.kv_cache_gib={args.prefix_kv_cache_gib}"
    plan = [
        (JOB_ON, lambda: run_job(args, model_path, input_path, workdir, mem, JOB_ON, (kv, "prepare.group_prefixes=true"))),
        (JOB_OFF, lambda: run_job(args, model_path, input_path, workdir, mem, JOB_OFF, (kv, "prepare.group_prefixes=false"))),
        (BARE_SORTED, lambda: bare_vllm.run_bare(group_by_prefix(prepared), engine_kwargs, mem, workdir)),
        (BARE_INPUT, lambda: bare_vllm.run_bare(prepared, engine_kwargs, mem, workdir)),
    ]
    # With --job-in-ray, a one-row job first: the first job in a Ray instance starts its worker
    # processes (about 20 s on a busy 2-core machine), which would be counted against whichever
    # contender runs first. A job run as its own process starts its own Ray every time.
    one_row = write_requests(workdir / f"{NAME}-one-row.parquet", requests[:1])
    warm_up_s = None
    if getattr(args, "job_in_ray", False) and time_left(f"{NAME}: warm-up"):
        log(f"{NAME}: a one-row job to start Ray's workers ...")
        warm_up_s = round(run_job(args, model_path, one_row, workdir, mem, "warm-up", (kv,)).wall_s, 2)
        log(f"  warm-up: wall {warm_up_s:.1f}s")
    runs: list[RunResult] = []
    for rep in range(args.repeats):
        # In an order rotated between repeats: the first run of a phase pays for what the later
        # ones find started (Ray's workers, the compile cache).
        for name, run in rotated(plan, rep):
            if not time_left(f"{NAME}: {name} (repeat {rep + 1})"):
                continue
            log(f"{NAME}: {name} (repeat {rep + 1}/{args.repeats}) ...")
            r = run()
            r.name, r.phase, r.rep = name, NAME, rep + 1
            log(f"  {name}: wall {r.wall_s:.1f}s" + (f", generate() {r.generate_s:.1f}s" if r.generate_s else "")
                + f", prefix-cache hit rate {r.prefix_cache_hit_rate}")
            runs.append(r)
    reference = next((r.texts for r in runs if r.name == BARE_INPUT), None)
    for r in runs:  # every run's answers against bare vLLM's on the rows in input order
        r.compared["same_text_as_bare"] = same_texts(r.texts, reference) if reference is not None else None

    def speedup(slow: str, fast: str, figure: str) -> dict:
        per_repeat = per_repeat_ratios(runs, slow, fast, figure)
        return {"median": median(per_repeat), "per_repeat": per_repeat}

    return {
        "rows": len(requests), "documents": args.prefix_documents, "questions": args.prefix_questions,
        "max_tokens": args.prefix_max_tokens, "kv_cache_gib": args.prefix_kv_cache_gib, "kv_cache_tokens": kv_tokens,
        "prompt_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1],
                          "total": sum(lengths)},
        "engine_kwargs": engine_kwargs, "warm_up_job_s": warm_up_s,
        "runs": [r.to_dict() for r in runs],
        # Input order's time over grouped's, within each repeat: how many times faster grouping is.
        "speedup": {
            "job_wall": speedup(JOB_OFF, JOB_ON, "wall_s"),
            "bare_vllm_generate": speedup(BARE_INPUT, BARE_SORTED, "generate_s"),
            "bare_vllm_wall": speedup(BARE_INPUT, BARE_SORTED, "wall_s"),
        },
        # The grouped job's wall time over bare vLLM's on sorted rows: what the job costs on top.
        "job_grouped_over_bare_sorted_wall": speedup(JOB_ON, BARE_SORTED, "wall_s"),
    }


def kv_bytes_per_token(model_path: str, dtype: str) -> int | None:
    """The KV cache one token takes in every layer (keys and values), from a local model's
    config and the engine's dtype; None for a model that is not a local folder."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dtype = config.get("torch_dtype") or config.get("dtype") if dtype == "auto" else dtype
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * (4 if "32" in str(dtype) else 2)
