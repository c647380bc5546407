"""Contender: the textbook PEFT training loop, what a user would write instead of the trainer.

`model(input_ids, attention_mask, labels)` with the full-vocabulary loss, on the same examples,
batches, optimizer and thread count as `pipeline.train.job`, whose own loop computes the
vocabulary projection and the loss at assistant positions only.
"""

from __future__ import annotations

import time

from benchmarks.job_config import compose
from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.results import TrainResult

NAME = "plain PEFT loop"


def run_plain_peft(model_path: str, data_path: str, epochs: int, mem: TreeMemory) -> TrainResult:
    """`epochs` epochs over the conversations at `data_path`, with the training config's settings."""
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
            for epoch in range(epochs):
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
    return TrainResult(name=NAME, steps=steps, train_tokens=tokens, train_s=seconds, memory=memory_figures(w))
