"""Contenders with LoRA: the job with every row on one of a few adapters against the job with
none, and the same two on one bare vLLM engine.

The adapters are random (rank 8 on every projection), published into a registry the job reads
(`lora_root`). The bare engine's ratio is what LoRA costs vLLM itself; the job's should match it,
adding nothing of its own.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from benchmarks.bare_vllm import SavedProcessState, token_prompts_and_params
from benchmarks.job import run_job
from benchmarks.job_config import job_setup
from benchmarks.memory import TreeMemory
from benchmarks.report import log
from benchmarks.results import median, per_repeat_ratios, ratio
from benchmarks.workload import make_requests, prepared_table, rotated, write_requests

RANK = 8
NONE, MIXED = "job, no adapter", "job, mixed adapters"


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


def lora_comparison(args, model_path: str, workdir: Path, mem: TreeMemory) -> dict:
    from pipeline.models.tiny_model import MODEL_NAME

    n = args.lora_rows or args.rows
    names = [f"bench-{i}" for i in range(args.lora_adapters)]
    root = workdir / "lora"
    log(f"LoRA: {len(names)} random rank-{RANK} adapters -> {root}")
    make_random_adapters(root, names, model_path, MODEL_NAME, rank=RANK)
    inputs = {NONE: write_requests(workdir / "lora-none.parquet", make_requests(n, args.max_tokens, args.seed)),
              MIXED: write_requests(workdir / "lora-mixed.parquet", make_requests(n, args.max_tokens, args.seed, lora=names))}
    runs = []
    for rep in range(args.repeats):
        for name in rotated([NONE, MIXED], rep):
            log(f"repeat {rep + 1}/{args.repeats}: {name} ...")
            r = run_job(args, model_path, inputs[name], workdir, mem, name, extra=[f"lora_root={root}"])
            r.rep = rep + 1
            log(f"  {r.name}: {r.output_tokens_per_s:.0f} out tok/s, wall {r.wall_s:.1f}s")
            runs.append(r)
    ratios = per_repeat_ratios(runs, MIXED, NONE, "output_tokens_per_s")
    bare = bare_lora_ratios(args, model_path, mem, inputs[NONE], names, root)
    return {"adapters": len(names), "rows": n, "runs": [r.to_dict() for r in runs],
            "mixed_over_none": median(ratios), "per_repeat": ratios,
            "bare_mixed_over_none": median(bare), "bare_per_repeat": bare}


def bare_lora_ratios(args, model_path: str, mem: TreeMemory, input_path: str, names: list[str], root: Path) -> list:
    """The rows at `input_path` through one bare vLLM engine with LoRA enabled, generate() alone,
    with no adapter and spread over the adapters, in turns: what LoRA costs the engine itself."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from pipeline.lora_registry import AdapterRegistry

    setup = job_setup(args, model_path, input_path)
    prepared = prepared_table(input_path, setup.settings, model_path)
    n = prepared.num_rows
    registry = AdapterRegistry(root)
    adapters = [registry.resolve(name) for name in names]
    requests = [LoRARequest(a.name, a.lora_int_id, str(a.path)) for a in adapters]
    mem.settle()
    ratios = []
    with SavedProcessState():
        llm = LLM(**setup.engine_kwargs(lora={"enabled": True, "max_rank": RANK, "max_loras": len(names)}))
        for rep in range(args.repeats):
            rates = {}
            for variant in rotated(["none", "mixed"], rep):
                prompts, params = token_prompts_and_params(prepared)
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
