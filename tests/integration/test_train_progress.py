"""Training that can be watched, stopped and resumed, on the tiny model through the real job:
evaluation during training, early stopping with the best step kept, checkpoints that survive
SIGKILL and resume to the same adapter bytes, TensorBoard event files."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from pipeline.lora_registry import AdapterRegistry
from pipeline.train.checkpoints import CheckpointFolder, run_folder
from pipeline.train.settings import TrainConfigError
from tests.integration.test_train_lora import train, train_subprocess

pytestmark = pytest.mark.integration

# 12 steps of 8 conversations, a validation pass every 4, a checkpoint every 5; dropout on, so
# the resumed run must restore the random generators too, and keep=best, so the best weights
# travel in the checkpoint as well.
RESUMABLE = ["train.max_steps=12", "train.eval_every=4", "train.keep=best", "train.save_every=5",
             "train.log_every=1", "train.lora.dropout=0.1"]


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("progress") / "lora"
    manifest = train(tiny_model_dir, root, "whole", *RESUMABLE)
    return {"root": root, "manifest": manifest}


def test_evaluations_are_recorded_and_the_best_is_kept(uninterrupted):
    m = uninterrupted["manifest"]
    assert [e["step"] for e in m["evaluations"]] == [4, 8, 12]
    assert all(0.0 <= e["accuracy"] <= 1.0 and e["loss"] > 0 for e in m["evaluations"])
    best = min(m["evaluations"], key=lambda e: e["loss"])
    assert m["kept"] == {"policy": "best", "step": best["step"]}
    assert (m["validation_loss"], m["validation_accuracy"]) == (best["loss"], best["accuracy"])
    assert m["stopped_early"] is False and m["resumed_from_step"] is None
    # Checkpoints go once the adapter is published; the event files stay.
    run = run_folder(uninterrupted["root"], "whole")
    assert sorted(os.listdir(run)) == ["tensorboard"] and m["tensorboard"] == str(run / "tensorboard")


def test_tensorboard_event_files_hold_the_logged_scalars(uninterrupted):
    m = uninterrupted["manifest"]
    found = scalars(m["tensorboard"])
    assert set(found) == {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                          "eval/loss", "eval/accuracy"}
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        assert [step for step, _ in found[tag]] == list(range(1, 13)), tag
    assert found["train/learning_rate"][-1][1] == pytest.approx(0.0)  # linear decay to 0
    assert all(v > 0 for _, v in found["train/grad_norm"] + found["train/tokens_per_second"])
    assert found["eval/loss"] == [(e["step"], pytest.approx(e["loss"])) for e in m["evaluations"]]
    assert found["eval/accuracy"] == [(e["step"], pytest.approx(e["accuracy"])) for e in m["evaluations"]]


def test_a_killed_run_resumes_to_the_same_adapter_bytes(uninterrupted, tiny_model_dir, tmp_path):
    """SIGKILL between the checkpoints of steps 5 and 10; then, as a kill in the middle of a
    checkpoint write leaves it, a half-written checkpoint of a later step. Rerunning the same
    command resumes from step 5 and ends with the uninterrupted run's adapter, byte for byte."""
    root = tmp_path / "lora"
    proc = train_subprocess(tiny_model_dir, root, "resumed", *RESUMABLE, tmp_path=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "step 7/12" in line:
                break
        else:
            pytest.fail("the run ended before step 7:\n" + "".join(seen[-30:]))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    checkpoints = run_folder(root, "resumed") / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["step-000005"]
    half = checkpoints / ".tmp-step-000010"
    half.mkdir()
    (half / "adapter.safetensors").write_bytes(b"cut short")
    assert AdapterRegistry(root).list() == []

    rerun = train_subprocess(tiny_model_dir, root, "resumed", *RESUMABLE, tmp_path=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-4000:]
    assert "resuming at step 5" in out

    whole, resumed = uninterrupted["root"] / "whole", root / "resumed"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    m = json.loads((resumed / "manifest.json").read_text())
    expected = uninterrupted["manifest"]
    assert m["resumed_from_step"] == 5 and m["steps"] == 12
    assert (m["evaluations"], m["kept"], m["train_loss"]) == (expected["evaluations"], expected["kept"],
                                                              expected["train_loss"])
    assert not checkpoints.exists()
    # Steps 6 and 7 were logged twice (killed run, resumed run): TensorBoard keeps the resumed ones.
    assert [s for s, _ in scalars(m["tensorboard"])["train/loss"]] == list(range(1, 13))


def test_sigterm_saves_a_checkpoint_and_a_changed_resume_is_refused(tiny_model_dir, tmp_path):
    """SIGTERM (a spot instance reclaimed) stops the run after the current step with a checkpoint,
    no checkpoint interval needed; the same name with another learning rate is then refused with
    what changed, and `train.resume=false` starts over."""
    root = tmp_path / "lora"
    args = ["train.max_steps=1000", "train.log_every=1", "train.report_to=none"]
    proc = train_subprocess(tiny_model_dir, root, "stopped", *args, tmp_path=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in proc.stdout:
            if "step 2/1000" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out = line + proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == 1, out[-3000:]
    assert "error: stopped by SIGTERM at step" in out and "rerun the same command to resume" in out
    (checkpoint,) = os.listdir(run_folder(root, "stopped") / "checkpoints")
    assert checkpoint.startswith("step-")

    with pytest.raises(TrainConfigError) as info:
        train(tiny_model_dir, root, "stopped", *args, "train.lr=0.01")
    (problem,) = info.value.problems
    assert f"train.resume: the checkpoint at step {int(checkpoint[5:])} in " in problem
    assert "(train.lr: 0.005 -> 0.01)" in problem and "train.resume=false" in problem
    m = train(tiny_model_dir, root, "stopped", "train.max_steps=2", "train.report_to=none", "train.resume=false")
    assert m["resumed_from_step"] is None and m["steps"] == 2


def test_early_stopping_stops_when_validation_loss_stops_improving_and_keeps_the_best(tiny_model_dir, tmp_path):
    """A constant, high learning rate makes the validation loss wander: the run stops at the
    first evaluation that does not beat the best, and the registry gets the best step's adapter,
    the same bytes as a run that simply ends at that step."""
    root = tmp_path / "lora"
    common = ["train.lr=0.05", "train.scheduler=constant", "train.warmup_ratio=0", "train.report_to=none"]
    m = train(tiny_model_dir, root, "early", *common, "train.max_steps=40", "train.eval_every=2",
              "train.early_stopping_patience=1", "train.keep=best")
    losses = [e["loss"] for e in m["evaluations"]]
    assert m["stopped_early"] is True and m["steps"] == m["evaluations"][-1]["step"] < 40
    assert losses[-1] >= min(losses[:-1]) and all(b < a for a, b in zip(losses[:-2], losses[1:-1]))
    best_step = min(m["evaluations"], key=lambda e: e["loss"])["step"]
    assert m["kept"] == {"policy": "best", "step": best_step} and best_step == m["steps"] - 2

    short = train(tiny_model_dir, root, "short", *common, f"train.max_steps={best_step}")
    assert short["steps"] == best_step
    assert (root / "early" / "adapter_model.safetensors").read_bytes() == \
        (root / "short" / "adapter_model.safetensors").read_bytes()


def test_eval_every_without_validation_rows_is_refused_before_training(tiny_model_dir, tmp_path):
    with pytest.raises(TrainConfigError, match=r"train\.eval_every: no validation rows \(1 conversations"):
        train(tiny_model_dir, tmp_path / "lora", "noval", "data.max_rows=1", "train.eval_every=2")
    assert not (tmp_path / "lora").exists() or AdapterRegistry(tmp_path / "lora").list() == []


def test_ray_train_workers_resume_to_the_same_adapter_bytes(tiny_model_dir, tmp_path):
    """Two DDP workers: rank 0 writes the shared state, each rank its random states, into one
    checkpoint; the driver killed between checkpoints (the whole process group, so Ray's helpers
    go too), the rerun resumes both ranks and ends with the uninterrupted two-worker run's adapter."""
    root = tmp_path / "lora"
    args = ["train.workers=2", "train.batch_size=4", "ray.num_cpus=2", "train.max_steps=8", "train.save_every=3",
            "train.log_every=1", "train.lora.dropout=0.1", "train.report_to=none"]
    whole = train_subprocess(tiny_model_dir, root, "ddp-whole", *args, tmp_path=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out[-4000:]

    proc = train_subprocess(tiny_model_dir, root, "ddp-resumed", *args, tmp_path=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in proc.stdout:
            if "step 5/8" in line:
                break
        else:
            pytest.fail("the run ended before step 5")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # Ray forwards the workers' log lines asynchronously: the run may be past step 6 by now, and the
    # kill may land while step 6's checkpoint is written or before step 3's is removed. Whatever it
    # left, the rerun resumes from the latest complete checkpoint.
    latest = CheckpointFolder(run_folder(root, "ddp-resumed") / "checkpoints").latest()
    assert latest is not None and latest.name in ("step-000003", "step-000006")
    checkpoint = latest.name

    rerun = train_subprocess(tiny_model_dir, root, "ddp-resumed", *args, tmp_path=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-4000:]
    assert json.loads((root / "ddp-resumed" / "manifest.json").read_text())["resumed_from_step"] == int(checkpoint[5:])
    assert (root / "ddp-resumed" / "adapter_model.safetensors").read_bytes() == \
        (root / "ddp-whole" / "adapter_model.safetensors").read_bytes()


def test_mlflow_run_holds_the_same_scalars(uninterrupted, tiny_model_dir, tmp_path):
    """train.report_to=mlflow: the same run logged to MLflow's (default) file store beside the
    registry's runs, read back with MLflow's own client."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "lora"
    m = train(tiny_model_dir, root, "whole", *RESUMABLE, "train.report_to=mlflow")
    assert m["tensorboard"] is None and m["mlflow"]["experiment"] == "whole"
    client = MlflowClient(m["mlflow"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("whole").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == str(m["config"]["train"]["lr"])
    expected = scalars(uninterrupted["manifest"]["tensorboard"])
    for tag in ("train/loss", "eval/loss"):
        logged = [(x.step, x.value) for x in client.get_metric_history(run.info.run_id, tag)]
        assert logged == [(step, pytest.approx(value, rel=1e-5)) for step, value in expected[tag]], tag
