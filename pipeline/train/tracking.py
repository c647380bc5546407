"""Experiment tracking: the run's scalars as TensorBoard event files (`train.report_to`).

Tags: `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_second` every
step; `eval/loss`, `eval/accuracy` at each evaluation. Open them with
`tensorboard --logdir <lora_root>/.runs`. Only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path


class Tracker:
    """Records nothing (`train.report_to=none`, and every rank but 0)."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in `log_dir` through torch's SummaryWriter (needs the tensorboard package)."""

    def __init__(self, log_dir: str | Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run first drops what the killed one logged after its checkpoint, so each
        # step appears once, as the resumed run computed it.
        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_step + 1 if resumed_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(report_to: str, log_dir: str | None, rank: int, resumed_step: int) -> Tracker:
    if report_to == "tensorboard" and log_dir and rank == 0:
        return TensorBoardTracker(log_dir, resumed_step)
    return Tracker()
