"""The training loop: a PEFT LoRA model on this process's share of the examples.

The same loop runs in-process (one worker) and on every Ray Train worker (`ray_train`), where
`fit` is given its rank, world size, device and Ray's DDP wrapper. torch, PEFT and transformers
are imported inside the functions that use them; `rank_schedule` is plain Python.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.train.labels import IGNORE, Example, label_count
from pipeline.train.settings import Hyperparameters

log = logging.getLogger("pipeline.train.loop")

# Steps kept in the metrics' history (a longer run keeps every k-th step).
HISTORY_POINTS = 1000
# Validation conversations the adapter answers greedily for the report, and their length cap.
VALIDATION_ANSWERS = 3
MAX_ANSWER_TOKENS = 128


@dataclass(frozen=True)
class FitJob:
    """What `fit` trains: the settings' hyperparameters and what the job derived for this run.
    Frozen and plain, so it travels to Ray Train's workers unchanged."""

    train: Hyperparameters
    """The settings' `train` section."""
    model_path: str
    """The weights to train: a local folder or a hub id (`settings.training_model_path`)."""
    base_model_name_or_path: str
    """What adapter_config.json records as the base model (`settings.base_model_name_or_path`)."""
    pad_id: int
    """The tokenizer's padding token id, for collation."""


def rank_schedule(n_examples: int, world_size: int, rank: int, batch_size: int, grad_accum: int, seed: int, epoch: int):
    """This rank's optimizer steps for one epoch: a list of steps, each a list of micro-batches
    of example indices.

    The epoch's order is a seeded shuffle; like DistributedSampler it is padded by wrapping
    around so every rank gets the same number of examples and therefore takes part in the
    same number of gradient all-reduces.
    """
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_rank = math.ceil(n_examples / world_size)
    while len(order) < per_rank * world_size:
        order += order[: per_rank * world_size - len(order)]
    mine = order[rank::world_size]
    per_step = batch_size * grad_accum
    steps = []
    for i in range(0, per_rank, per_step):
        chunk = mine[i : i + per_step]
        steps.append([chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)])
    return steps


def collate(batch: list[Example], pad_id: int, device):
    """(input_ids, attention_mask, labels) tensors on `device`, right-padded to the longest."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _loss_module(peft_model):
    """Wrap the PEFT model in a module whose forward returns the summed assistant-token loss.

    The LM head runs only on the positions that carry a label: with Llama 3's 128k-token
    vocabulary, full logits for a batch would cost more memory than the model itself. It is
    one module so that DDP (which hooks `forward`) wraps the whole computation.
    """
    import torch
    import torch.nn.functional as F

    class AssistantLoss(torch.nn.Module):
        def __init__(self, peft_model):
            super().__init__()
            self.peft_model = peft_model

        def forward(self, input_ids, attention_mask, labels):
            lm = self.peft_model.get_base_model()  # LoRA layers are injected into it in place
            hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != IGNORE
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
            return F.cross_entropy(logits, targets[keep], reduction="sum")

    return AssistantLoss(peft_model)


def fit(job: FitJob, train_ex: list[Example], val_ex: list[Example], out_dir: Path | None,
        rank: int = 0, world_size: int = 1, device=None, wrap=None) -> dict:
    """Train a LoRA adapter on this process's share of the examples; write the PEFT files to
    `out_dir` (rank 0 only) and return the run's metrics (the same on every rank).

    `wrap` puts the loss module under DDP (Ray Train's `prepare_model`) when several processes
    train together.
    """
    import torch

    t = job.train
    if device is None:
        device = torch.device("cuda" if t.use_gpu and torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        # As many threads as cores claimed: OpenMP threads spin while waiting, so more threads
        # than free cores (other workers, other jobs) slows training down by an order of magnitude.
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    try:
        return _fit(job, train_ex, val_ex, out_dir, rank, world_size, device, wrap)
    finally:
        torch.set_num_threads(threads)


def _fit(job: FitJob, train_ex, val_ex, out_dir, rank, world_size, device, wrap) -> dict:
    import contextlib
    from collections import deque

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    t = job.train
    seed = int(t.seed)
    torch.manual_seed(seed)  # same LoRA initialization on every rank
    base = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=getattr(torch, t.dtype))
    base.config.use_cache = False
    if t.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = t.lora
    targets = lora.target_modules
    peft_model = get_peft_model(base, LoraConfig(
        r=int(lora.rank), lora_alpha=lora.alpha, lora_dropout=float(lora.dropout),
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none", task_type="CAUSAL_LM",
    ))
    # The float checkpoint's local path means nothing on the machines that serve the adapter.
    peft_model.peft_config["default"].base_model_name_or_path = job.base_model_name_or_path
    module = _loss_module(peft_model).to(device)
    model = wrap(module) if wrap else module
    torch.manual_seed(seed + 1 + rank)  # dropout masks differ per rank, repeatably

    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=float(t.lr), weight_decay=float(t.weight_decay))
    bs, accum = int(t.batch_size), int(t.grad_accum)
    steps_per_epoch = len(rank_schedule(len(train_ex), world_size, rank, bs, accum, seed, 0))
    total = int(t.max_steps or t.epochs * steps_per_epoch)
    sched = get_scheduler(t.scheduler, opt, num_warmup_steps=round(float(t.warmup_ratio) * total),
                          num_training_steps=total)
    pad_id, log_every, clip = job.pad_id, int(t.log_every), float(t.max_grad_norm)
    if rank == 0:
        log.info("training %s trainable LoRA parameters (rank %s) on %s: %d examples, %d worker(s), "
                 "%d steps (%d per epoch, %d examples per step per worker)",
                 f"{trainable:,}", lora.rank, device, len(train_ex), world_size, total, steps_per_epoch, bs * accum)

    window: deque = deque(maxlen=max(1, min(steps_per_epoch, total)))  # last epoch's (loss_sum, labels)
    # Every optimizer step's loss, learning rate and running tokens/s (thinned to about
    # HISTORY_POINTS steps on a long run): the report's curves.
    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "tokens_per_second": []}
    history_every = max(1, math.ceil(total / HISTORY_POINTS))
    first_loss = None
    tokens = labels_seen = 0
    step = epoch = 0
    started = time.time()
    model.train()
    while step < total:
        for micro_batches in rank_schedule(len(train_ex), world_size, rank, bs, accum, seed, epoch):
            if step >= total:
                break
            batches = [[train_ex[i] for i in mb] for mb in micro_batches]
            local_labels = sum(label_count(ex) for b in batches for ex in b)
            local_tokens = sum(len(ex.input_ids) for b in batches for ex in b)
            global_labels, global_tokens = _all_reduce_sum([local_labels, local_tokens], device)
            # Per-token mean over the whole step across ranks: DDP averages gradients over
            # ranks, so each rank scales its sum by world_size / (all ranks' label tokens).
            scale = world_size / max(global_labels, 1.0)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for k, batch in enumerate(batches):
                last = k == len(batches) - 1
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    loss = model(*collate(batch, pad_id, device))
                    (loss * scale).backward()
                loss_sum += float(loss.detach())
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            step += 1
            (global_loss,) = _all_reduce_sum([loss_sum], device)
            step_loss = global_loss / max(global_labels, 1.0)
            first_loss = step_loss if first_loss is None else first_loss
            window.append((global_loss, global_labels))
            tokens += int(global_tokens)
            labels_seen += int(global_labels)
            if step % history_every == 0 or step == total or step == 1:
                elapsed = time.time() - started
                for key, value in (("step", step), ("loss", round(step_loss, 6)),
                                   ("lr", sched.get_last_lr()[0]), ("tokens_per_second", round(tokens / max(elapsed, 1e-9), 1))):
                    history[key].append(value)
            if rank == 0 and (step % log_every == 0 or step == total or step == 1):
                elapsed = time.time() - started
                log.info("step %d/%d  epoch %d  loss %.4f  lr %.2e  %.0f tokens/s  elapsed %.1fs  ETA %.1fs",
                         step, total, epoch + 1, step_loss, sched.get_last_lr()[0], tokens / max(elapsed, 1e-9),
                         elapsed, elapsed / step * (total - step))
        epoch += 1
    train_seconds = time.time() - started

    val_loss = evaluate(module, val_ex[rank::world_size], pad_id, bs, device) if val_ex else None
    # Rank 0 alone, after the last collective operation: the other ranks do not wait for it.
    answers = greedy_answers(peft_model, job, val_ex[:VALIDATION_ANSWERS], device) if rank == 0 and val_ex else []
    if out_dir is not None:
        # The vocabulary is never resized here, so PEFT need not look the base model up (on
        # the hub, for a local model's name) to decide whether to save the embeddings.
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        # PEFT also writes a boilerplate model card; the manifest is this adapter's record.
        Path(out_dir, "README.md").unlink(missing_ok=True)
    return {
        "steps": step,
        "epochs_run": step / max(steps_per_epoch, 1),
        "workers": world_size,
        "trainable_parameters": trainable,
        "first_step_loss": first_loss,
        "train_loss": sum(x for x, _ in window) / max(sum(n for _, n in window), 1.0),
        "validation_loss": val_loss,
        "train_tokens": tokens,
        "trained_label_tokens": labels_seen,
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": tokens / max(train_seconds, 1e-9),
        "history": history,
        "validation_answers": answers,
    }


def greedy_answers(peft_model, job: FitJob, examples: list[Example], device) -> list[dict]:
    """The adapter's greedy answer to a few validation conversations, beside the reference: for
    each, its text up to the first assistant turn, that turn as the data has it, and what the
    adapter generates after the same prompt."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    model = peft_model.eval()
    answers = []
    with torch.no_grad():
        for ex in examples:
            start = next((i for i, label in enumerate(ex.labels) if label != IGNORE), None)
            if start is None:
                continue
            end = next((i for i in range(start, len(ex.labels)) if ex.labels[i] == IGNORE), len(ex.labels))
            prompt = torch.tensor([ex.input_ids[:start]], device=device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=min(end - start + 16, MAX_ANSWER_TOKENS), use_cache=True,
                                 pad_token_id=job.pad_id)
            answers.append({
                "prompt": tokenizer.decode(ex.input_ids[:start]),
                "reference": tokenizer.decode(ex.input_ids[start:end]),
                "answer": tokenizer.decode(out[0, start:].tolist()),
            })
    model.train()
    return answers


def evaluate(module, examples: list[Example], pad_id: int, batch_size: int, device) -> float | None:
    """Per-token loss over the examples, summed over every rank's share."""
    import torch

    module.eval()
    loss_sum = labels = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            loss_sum += float(module(*collate(batch, pad_id, device)))
            labels += sum(label_count(ex) for ex in batch)
    module.train()
    loss_sum, labels = _all_reduce_sum([loss_sum, labels], device)
    return loss_sum / labels if labels else None
