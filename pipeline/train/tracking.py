"""Experiment tracking: the run's scalars in the tracker people already use (`train.report_to`).

Tags: `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_second` every
step; `eval/loss`, `eval/accuracy` at each evaluation. Only rank 0 writes.
- `tensorboard`: event files; open them with `tensorboard --logdir <lora_root>/.runs`.
- `mlflow`: an MLflow run named after the adapter, in the experiment of that name, at
  `train.mlflow_uri` (a tracking server, `sqlite:///...`, or by default a file store in
  `<lora_root>/.runs/mlflow`); `mlflow ui --backend-store-uri <that uri>` shows it. A resumed run
  continues the same MLflow run (its id is kept beside the checkpoints).
"""

from __future__ import annotations

import os
import time
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


class MLflowTracker(Tracker):
    """Metrics of one MLflow run, through MLflow's own client."""

    def __init__(self, uri: str, name: str, run_id_file: Path, params: dict, resumed_step: int = 0):
        if uri.startswith("file:"):
            # MLflow keeps its file store for those who ask for it (it prefers a database): the
            # default here is a folder beside the checkpoints, so that nothing needs a server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        # A resumed run continues its MLflow run; a fresh start (no checkpoint) begins a new one.
        run_id = run_id_file.read_text().strip() if resumed_step and run_id_file.is_file() else None
        if run_id is None:
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            for key, value in sorted(params.items())[:100]:
                self.client.log_param(run_id, key, str(value)[:500])
            run_id_file.parent.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(run_id)
        self.run_id = run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(v), now, step) for tag, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_tracker(report_to: str, log_dir: str | None, rank: int, resumed_step: int, mlflow_uri: str | None = None,
                 run_name: str = "", params: dict | None = None) -> Tracker:
    if rank != 0 or not log_dir:
        return Tracker()
    if report_to == "tensorboard":
        return TensorBoardTracker(log_dir, resumed_step)
    if report_to == "mlflow" and mlflow_uri:
        return MLflowTracker(mlflow_uri, run_name, Path(log_dir).parent / "mlflow_run_id", params or {}, resumed_step)
    return Tracker()
