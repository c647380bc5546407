"""The training loop: a PEFT LoRA model on this process's share of the examples.

The same loop runs in-process (one worker) and on every Ray Train worker (`ray_train`), where
`fit` is given its rank, world size, device and Ray's DDP wrapper. torch, PEFT and transformers
are imported inside the functions that use them; `rank_schedule` is plain Python.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import JobFailure
from pipeline.train.checkpoints import CheckpointFolder, Progress, restore_checkpoint, save_checkpoint
from pipeline.train.evaluation import VALIDATION_ANSWERS, EvalHistory, Evaluation, evaluate, greedy_answers
from pipeline.train.labels import IGNORE, Example, label_count
from pipeline.train.settings import Hyperparameters
from pipeline.train.tracking import open_tracker

log = logging.getLogger("pipeline.train.loop")

# Steps kept in the metrics' history (a longer run keeps every k-th step).
HISTORY_POINTS = 1000


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
    checkpoint_dir: str | None = None
    """Where resumable checkpoints go (`checkpoints.run_folder`); null: none are written or read."""
    identity: dict = field(default_factory=dict)
    """What decides this run's adapter (`checkpoints.run_identity`), stored in each checkpoint."""
    log_dir: str | None = None
    """Where the tracker writes (`train.report_to`); null: nowhere."""
    mlflow_uri: str | None = None
    """report_to=mlflow: the tracking URI (`pipeline.train.tracking`)."""
    run_name: str = ""
    """The adapter's name: the MLflow experiment and run."""


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


def collate_packed(batch: list[Example], device):
    """(input_ids, None, labels, position_ids): the conversations end to end in one row, no
    padding. Positions restart at each conversation, and with no attention mask transformers
    builds the block-diagonal causal mask from them, so no token attends across conversations.
    Each conversation starts with <|begin_of_text|>, never labelled, so no loss crosses one either."""
    import torch

    ids = torch.tensor([[t for ex in batch for t in ex.input_ids]])
    labels = torch.tensor([[t for ex in batch for t in ex.labels]])
    positions = torch.tensor([[i for ex in batch for i in range(len(ex.input_ids))]])
    return ids.to(device), None, labels.to(device), positions.to(device)


def batch_tensors(batch: list[Example], pad_id: int, device, packing: bool) -> tuple:
    """The loss module's arguments for one micro-batch: packed (`train.packing`) or padded."""
    return collate_packed(batch, device) if packing else collate(batch, pad_id, device)


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

        def forward(self, input_ids, attention_mask, labels, position_ids=None, count_correct=False):
            lm = self.peft_model.get_base_model()  # LoRA layers are injected into it in place
            # No cache: with one, transformers would not build the packed rows' block-diagonal mask.
            hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != IGNORE
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
            loss = F.cross_entropy(logits, targets[keep], reduction="sum")
            if count_correct:  # evaluation: also how many next tokens greedy decoding gets right
                return loss, (logits.argmax(-1) == targets[keep]).sum()
            return loss

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


class _StopOnSigterm:
    """SIGTERM (a spot instance reclaimed, a scheduler's stop) asks the run to stop after the
    current step, with a checkpoint. Signal handlers can only be set from the main thread; Ray
    Train runs the loop in another, where the signal is Ray's to handle."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM: stopping after this step, with a checkpoint")

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def _fit(job: FitJob, train_ex, val_ex, out_dir, rank, world_size, device, wrap) -> dict:
    import contextlib

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

    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    params = list(named.values())
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=float(t.lr), weight_decay=float(t.weight_decay))
    bs, accum = int(t.batch_size), int(t.grad_accum)
    steps_per_epoch = len(rank_schedule(len(train_ex), world_size, rank, bs, accum, seed, 0))
    total = int(t.max_steps or t.epochs * steps_per_epoch)
    sched = get_scheduler(t.scheduler, opt, num_warmup_steps=round(float(t.warmup_ratio) * total),
                          num_training_steps=total)
    pad_id, log_every, clip = job.pad_id, int(t.log_every), float(t.max_grad_norm)
    window_size = max(1, min(steps_per_epoch, total))

    folder = CheckpointFolder(job.checkpoint_dir) if job.checkpoint_dir else None
    progress, history, best = Progress(), EvalHistory(t.early_stopping_patience, float(t.early_stopping_min_delta)), None
    restored = restore_checkpoint(folder, rank, named, opt, sched) if folder else None
    if restored:
        state, best = restored
        progress = Progress(**state["progress"])
        history = EvalHistory.from_json(state["evaluations"], history.patience, history.min_delta)
    resumed_from = progress.step
    if rank == 0:
        log.info("training %s trainable LoRA parameters (rank %s) on %s: %d examples, %d worker(s), "
                 "%d steps (%d per epoch, %d examples per step per worker)%s",
                 f"{trainable:,}", lora.rank, device, len(train_ex), world_size, total, steps_per_epoch, bs * accum,
                 f"; resuming at step {resumed_from}" if resumed_from else "")
    tracker = open_tracker(t.report_to, job.log_dir, rank, resumed_from, job.mlflow_uri, job.run_name,
                           {f"train.{k}": v for k, v in dataclasses.asdict(t).items()})

    def run_evaluation() -> None:
        nonlocal best
        measured = evaluate(module, val_ex[rank::world_size], pad_id, bs, device, t.packing)
        if measured is None:
            return
        ev = Evaluation(step=progress.step, loss=measured[0], accuracy=measured[1])
        if history.add(ev) and t.keep == "best":
            best = {k: p.detach().clone() for k, p in named.items()}
        tracker.scalars(ev.step, {"eval/loss": ev.loss, "eval/accuracy": ev.accuracy})
        if rank == 0:
            log.info("eval step %d: validation loss %.4f, accuracy %.4f (best: step %d, %.4f)",
                     ev.step, ev.loss, ev.accuracy, history.best.step, history.best.loss)

    # Every optimizer step's loss, learning rate and running tokens/s (thinned to about
    # HISTORY_POINTS steps on a long run): the report's curves, carried by checkpoints.
    curve_every = max(1, math.ceil(total / HISTORY_POINTS))
    started = time.time()
    stopped_early = history.should_stop
    model.train()
    with _StopOnSigterm() as sigterm:
        while progress.step < total and not stopped_early:
            epoch, offset = divmod(progress.step, steps_per_epoch)
            for micro_batches in rank_schedule(len(train_ex), world_size, rank, bs, accum, seed, epoch)[offset:]:
                if progress.step >= total:
                    break
                step_started = time.time()
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
                        loss = model(*batch_tensors(batch, pad_id, device, t.packing))
                        (loss * scale).backward()
                    loss_sum += float(loss.detach())
                # An infinite bound measures the norm and leaves the gradients as they are.
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
                opt.step()
                sched.step()
                (global_loss,) = _all_reduce_sum([loss_sum], device)
                step_loss = global_loss / max(global_labels, 1.0)
                progress.step += 1
                progress.first_loss = step_loss if progress.first_loss is None else progress.first_loss
                progress.window = [*progress.window, [global_loss, global_labels]][-window_size:]
                progress.tokens += int(global_tokens)
                progress.labels_seen += int(global_labels)
                step, lr = progress.step, sched.get_last_lr()[0]
                if step % curve_every == 0 or step == total or step == 1:
                    so_far = progress.seconds + time.time() - started
                    for key, value in (("step", step), ("loss", round(step_loss, 6)), ("lr", lr),
                                       ("tokens_per_second", round(progress.tokens / max(so_far, 1e-9), 1))):
                        progress.curve.setdefault(key, []).append(value)
                tracker.scalars(step, {"train/loss": step_loss, "train/learning_rate": lr, "train/grad_norm": grad_norm,
                                       "train/tokens_per_second": global_tokens / max(time.time() - step_started, 1e-9)})
                if rank == 0 and (step % log_every == 0 or step == total or step == 1):
                    elapsed = time.time() - started
                    log.info("step %d/%d  epoch %d  loss %.4f  lr %.2e  %.0f tokens/s  elapsed %.1fs  ETA %.1fs",
                             step, total, epoch + 1, step_loss, lr,
                             progress.tokens / max(progress.seconds + elapsed, 1e-9),
                             elapsed, elapsed / max(step - resumed_from, 1) * (total - step))
                if t.eval_every and step % int(t.eval_every) == 0 and val_ex:
                    run_evaluation()
                    stopped_early = history.should_stop
                due = t.save_every and step % int(t.save_every) == 0 and step < total
                if folder and (due or sigterm.requested):
                    so_far = dataclasses.replace(progress, seconds=progress.seconds + time.time() - started)
                    where = save_checkpoint(folder, job.identity, rank, named, best, opt, sched, so_far, history,
                                            steps_per_epoch)
                    tracker.flush()  # what a resumed run will not log again is on disk
                    if rank == 0:
                        log.info("checkpoint step %d -> %s", step, where)
                if sigterm.requested:
                    tracker.close()
                    raise JobFailure(f"stopped by SIGTERM at step {step}/{total}"
                                     + ("; rerun the same command to resume from its checkpoint" if folder else ""))
                if stopped_early:
                    if rank == 0:
                        log.info("early stopping at step %d: %d evaluations without improvement", step,
                                 history.since_improvement)
                    break
    progress.seconds += time.time() - started

    if val_ex and (history.last is None or history.last.step != progress.step):
        run_evaluation()
    kept = history.best if t.keep == "best" else history.last
    if t.keep == "best" and best is not None:
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(best[k])
    tracker.close()
    # Rank 0 alone, after the last collective operation: the other ranks do not wait for it.
    answers = greedy_answers(peft_model, job, val_ex[:VALIDATION_ANSWERS], device) if rank == 0 and val_ex else []
    if out_dir is not None:
        # The vocabulary is never resized here, so PEFT need not look the base model up (on
        # the hub, for a local model's name) to decide whether to save the embeddings.
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        # PEFT also writes a boilerplate model card; the manifest is this adapter's record.
        Path(out_dir, "README.md").unlink(missing_ok=True)
        _sort_target_modules(Path(out_dir, "adapter_config.json"))
    window = progress.window
    return {
        "steps": progress.step,
        "epochs_run": progress.step / max(steps_per_epoch, 1),
        "workers": world_size,
        "trainable_parameters": trainable,
        "first_step_loss": progress.first_loss,
        "train_loss": sum(x for x, _ in window) / max(sum(n for _, n in window), 1.0),
        "validation_loss": kept.loss if kept else None,
        "validation_accuracy": kept.accuracy if kept else None,
        "evaluations": [dataclasses.asdict(e) for e in history.evaluations],
        "kept": {"policy": t.keep, "step": kept.step if kept and t.keep == "best" else progress.step},
        "stopped_early": history.should_stop,
        "resumed_from_step": resumed_from or None,
        "train_tokens": progress.tokens,
        "trained_label_tokens": progress.labels_seen,
        "train_seconds": round(progress.seconds, 3),
        "tokens_per_second": progress.tokens / max(progress.seconds, 1e-9),
        "history": progress.curve,
        "validation_answers": answers,
    }


def _sort_target_modules(config_path: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in hash order, which differs between
    processes; sorted, the same training gives the same config bytes (and content hash)."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
