"""Resumable training checkpoints: where they live, what identifies the run they belong to, and
writing and reading them atomically.

Layout, per adapter name, beside the registry (a dot folder, so the registry never lists it):

    <lora_root>/.runs/<name>/
      checkpoints/step-000040/      the latest complete checkpoint (older ones are removed)
        adapter.safetensors         the trainable LoRA weights
        best.safetensors            the best evaluation's weights (train.keep=best)
        optimizer.pt                AdamW's and the scheduler's states
        rng-<rank>.pt               each worker's torch / CUDA / Python random states
        state.json                  step, data position, progress, evaluations, the run's identity;
                                    written last
      checkpoints/.tmp-step-*/      a checkpoint being written; renamed into place when complete
      tensorboard/                  the event files (pipeline.train.tracking)

A run killed at any moment leaves either the previous complete checkpoint or the new one, never a
half-written one: the folder is renamed into place only after `state.json` is in it. The job
removes `checkpoints/` once the adapter is published.

The identity of a run is every setting that decides the adapter's bytes, plus the data's
fingerprint; a checkpoint made under another identity is refused with what changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.train.evaluation import EvalHistory
from pipeline.train.settings import TrainConfigError

RUNS_FOLDER = ".runs"
STATE = "state.json"
_STEP_RE = re.compile(r"step-(\d+)")
# Settings that change where a run is watched or how often it is saved, not what it computes.
_NOT_IDENTITY = {"data.path", "train.log_every", "train.save_every", "train.resume", "train.report_to",
                 "train.log_dir", "train.mlflow_uri", "train.cpus_per_worker"}
_UNSET = "(unset)"


@dataclass
class Progress:
    """How far a run has got, besides its tensors: what a checkpoint carries to the resumed run."""

    step: int = 0
    first_loss: float | None = None
    window: list = field(default_factory=list)  # [loss_sum, label_tokens] of the last epoch's steps
    tokens: int = 0
    labels_seen: int = 0
    seconds: float = 0.0  # training time before this process
    curve: dict = field(default_factory=dict)  # step, loss, lr, tokens/s of some steps: the report's curves


def run_folder(lora_root: str | os.PathLike, name: str) -> Path:
    """The adapter's training folder: checkpoints and event files, outside the published adapter."""
    return Path(lora_root) / RUNS_FOLDER / name


def run_identity(record: dict, data_fingerprint: str) -> dict:
    """What decides a run's adapter, flat (`train.lr`: value): the settings' record
    (`TrainSettings.record`) less what only affects saving and watching, plus the data's content."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif prefix not in _NOT_IDENTITY:
            flat[prefix] = value

    walk("", {k: record[k] for k in ("data", "train", "model", "prompt")})
    flat["data.fingerprint"] = data_fingerprint
    return flat


def identity_changes(saved: dict, current: dict) -> list[str]:
    """`key: before -> now` for every difference between two identities."""
    return [f"{k}: {saved.get(k, _UNSET)!r} -> {current.get(k, _UNSET)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, _UNSET) != current.get(k, _UNSET)]


class CheckpointFolder:
    """The checkpoints of one adapter's run (`<run folder>/checkpoints`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        found = [(int(m.group(1)), p) for p in self.path.glob("step-*")
                 if (m := _STEP_RE.fullmatch(p.name)) and (p / STATE).is_file()]
        return max(found)[1] if found else None

    def state(self, checkpoint: Path) -> dict:
        return json.loads((checkpoint / STATE).read_text())

    def pending(self, step: int) -> Path:
        """The folder a checkpoint of `step` is written into before it is complete (the same
        name on every worker, so they can all write their part)."""
        return self.path / f".tmp-step-{step:06d}"

    def commit(self, pending: Path, step: int, state: dict) -> Path:
        """Write `state.json` last, rename the folder into place, then drop older checkpoints
        and leftovers of writes that never finished."""
        (pending / STATE).write_text(json.dumps(state, indent=1) + "\n")
        final = self.path / f"step-{step:06d}"
        shutil.rmtree(final, ignore_errors=True)  # a SIGTERM save at a step already saved
        os.replace(pending, final)
        for other in self.path.iterdir():
            if other != final:
                shutil.rmtree(other, ignore_errors=True)
        return final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def save_tensors(path: Path, named_params: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in named_params.items()}, str(path))


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def rng_state() -> dict:
    """Every random generator training draws from (dropout, and anything seeded globally)."""
    import random

    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_optimizer(path: Path, optimizer, scheduler) -> None:
    import torch

    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)


def load_optimizer(path: Path, optimizer, scheduler) -> None:
    import torch

    saved = torch.load(path, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])


def save_rng(path: Path) -> None:
    import torch

    torch.save(rng_state(), path)


def load_rng(path: Path) -> None:
    import torch

    # Python's random state is a tuple of ints; torch's safe loader does not take tuples.
    set_rng_state(torch.load(path, weights_only=False))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(folder: CheckpointFolder, identity: dict, rank: int, named: dict, best: dict | None, opt, sched,
                    progress: Progress, history: EvalHistory, steps_per_epoch: int) -> Path | None:
    """Every rank writes its random states into the pending folder; rank 0 writes the rest and
    renames it into place once all are in."""
    pending = folder.pending(progress.step)
    if rank == 0:
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir(parents=True)
    _barrier()
    save_rng(pending / f"rng-{rank}.pt")
    _barrier()
    final = None
    if rank == 0:
        save_tensors(pending / "adapter.safetensors", named)
        if best is not None:
            save_tensors(pending / "best.safetensors", best)
        save_optimizer(pending / "optimizer.pt", opt, sched)
        epoch, offset = divmod(progress.step, steps_per_epoch)
        final = folder.commit(pending, progress.step, {
            "step": progress.step, "epoch": epoch, "steps_into_epoch": offset,
            "progress": dataclasses.asdict(progress), "evaluations": history.to_json(), "identity": identity,
        })
    _barrier()
    return final


def restore_checkpoint(folder: CheckpointFolder, rank: int, named: dict, opt, sched) -> tuple[dict, dict | None] | None:
    """Load the latest checkpoint into the model, optimizer, scheduler and random generators;
    its state and the best weights, or None when there is none."""
    import torch

    latest = folder.latest()
    if latest is None:
        return None
    saved = load_tensors(latest / "adapter.safetensors")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(saved[k])
    load_optimizer(latest / "optimizer.pt", opt, sched)
    load_rng(latest / f"rng-{rank}.pt")
    best_file = latest / "best.safetensors"
    best = {k: v.to(named[k].device) for k, v in load_tensors(best_file).items()} if best_file.is_file() else None
    return folder.state(latest), best


@dataclass(frozen=True)
class RunFolders:
    """Where a run keeps its checkpoints and event files, and the step it resumes from."""

    checkpoints: CheckpointFolder
    log_dir: Path
    resume_step: int


def prepare_run(lora_root: str, name: str, identity: dict, resume: bool, log_dir: str | None) -> RunFolders:
    """The adapter's run folders, checked before any training: a checkpoint left by an earlier
    run of this name is resumed when it has the same identity, refused with what changed when
    not, and discarded with `train.resume=false`. A fresh start replaces the earlier run's
    events in the default log folder (a folder the user named is left to them)."""
    run = run_folder(lora_root, name)
    folder = CheckpointFolder(run / "checkpoints")
    latest = folder.latest()
    if latest is not None and not resume:
        folder.discard()
        latest = None
    if latest is not None:
        state = folder.state(latest)
        changes = identity_changes(state["identity"], identity)
        if changes:
            raise TrainConfigError([
                f"train.resume: the checkpoint at step {state['step']} in {latest} was made with other "
                f"settings or data ({'; '.join(changes)}); rerun with the same ones to resume, "
                "or add train.resume=false to discard it and start over"
            ])
    if latest is None and log_dir is None:
        shutil.rmtree(run / "tensorboard", ignore_errors=True)
    step = folder.state(latest)["step"] if latest is not None else 0
    return RunFolders(checkpoints=folder, log_dir=Path(log_dir) if log_dir else run / "tensorboard", resume_step=step)
