"""LoRA training: `pipeline.train.job` against the plain PEFT loop (`benchmarks.plain_peft`), on
the same conversations, in turns; the figure is the ratio of training tokens per second.

The trainer's time is the training loop alone, as its manifest records it, so model loading and
saving count for neither contender.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.job_config import compose
from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.plain_peft import NAME as PLAIN, run_plain_peft
from benchmarks.report import log
from benchmarks.results import TrainResult, median, per_repeat_ratios
from benchmarks.workload import rotated

TRAINER = "pipeline.train.job"


def run_trainer(model_path: str, data_path: str, epochs: int, workdir: Path, mem: TreeMemory) -> TrainResult:
    """`pipeline.train.job.run` on the conversations at `data_path`, into a registry under `workdir`."""
    from pipeline.train.job import run

    cfg = compose("train_lora", [
        "model=tiny", f"model.path={model_path}", f"lora_root={workdir / 'trained'}", f"adapter.name=bench-{time.time_ns()}",
        f"data.path={data_path}", "data.validation_fraction=0.0", f"train.epochs={epochs}",
    ])
    with mem.window("trainer") as w:
        manifest = run(cfg)
    return TrainResult(name=TRAINER, steps=manifest["steps"], train_tokens=manifest["train_tokens"],
                       train_s=manifest["train_seconds"], memory=memory_figures(w))


def train_comparison(args, model_path: str, workdir: Path, mem: TreeMemory) -> dict:
    from data.build_train_sample import write_sample_dataset

    data = str(write_sample_dataset(workdir / "train.parquet", n=args.train_rows))
    runs = []
    for rep in range(args.repeats):
        for name in rotated([TRAINER, PLAIN], rep):
            log(f"repeat {rep + 1}/{args.repeats}: training, {'trainer' if name == TRAINER else 'plain'} ...")
            if name == TRAINER:
                r = run_trainer(model_path, data, args.train_epochs, workdir, mem)
            else:
                r = run_plain_peft(model_path, data, args.train_epochs, mem)
            r.rep = rep + 1
            log(f"  {r.name}: {r.tokens_per_s:.0f} tokens/s over {r.train_s:.1f}s")
            runs.append(r)
    ratios = per_repeat_ratios(runs, TRAINER, PLAIN, "tokens_per_s")
    return {"conversations": args.train_rows, "epochs": args.train_epochs, "runs": [r.to_dict() for r in runs],
            "trainer_over_plain": median(ratios), "per_repeat": ratios}
