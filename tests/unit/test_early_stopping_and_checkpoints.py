"""Evaluation decisions, run identity and checkpoint folders (`pipeline.train.evaluation`,
`pipeline.train.checkpoints`): plain logic, no torch."""

from __future__ import annotations

import json

import pytest
from tests.conftest import compose

from pipeline.train.checkpoints import STATE, CheckpointFolder, identity_changes, prepare_run, run_identity, run_folder
from pipeline.train.evaluation import EvalHistory, Evaluation
from pipeline.train.settings import TrainConfigError, TrainSettings


def ev(step, loss):
    return Evaluation(step=step, loss=loss, accuracy=0.5)


def test_early_stopping_counts_evaluations_without_improvement():
    history = EvalHistory(patience=2)
    assert history.add(ev(10, 3.0)) and not history.should_stop
    assert history.add(ev(20, 2.5)) and history.since_improvement == 0
    assert not history.add(ev(30, 2.6)) and not history.should_stop
    assert not history.add(ev(40, 2.5)) and history.should_stop  # equal is not better
    assert history.best == ev(20, 2.5) and history.last == ev(40, 2.5)


def test_an_improvement_smaller_than_min_delta_does_not_reset_patience_but_is_still_best():
    history = EvalHistory(patience=2, min_delta=0.1)
    history.add(ev(1, 3.0))
    assert history.add(ev(2, 2.95))  # the new best ...
    assert history.since_improvement == 1  # ... but not by enough to count as progress
    history.add(ev(3, 2.94))
    assert history.should_stop and history.best.step == 3


def test_without_patience_it_never_stops_and_survives_json():
    history = EvalHistory()
    for step, loss in enumerate([3.0, 3.1, 3.2, 3.3], start=1):
        history.add(ev(step, loss))
    assert not history.should_stop and history.best.step == 1
    again = EvalHistory.from_json(json.loads(json.dumps(history.to_json())), patience=2, min_delta=0.0)
    assert again.evaluations == history.evaluations and again.since_improvement == 3 and again.should_stop


def settings(*overrides):
    return TrainSettings.from_config(compose("train_lora", ["model=tiny", "adapter.name=a", *overrides]))


def test_identity_covers_what_decides_the_adapter_and_not_how_it_is_watched():
    base = run_identity(settings().record(), "sha256:data")
    assert base["train.lr"] == 5.0e-3 and base["data.fingerprint"] == "sha256:data"
    assert "train.log_every" not in base and "data.path" not in base
    watched = run_identity(settings("train.log_every=1", "train.save_every=3", "train.report_to=none",
                                    "data.path=elsewhere.parquet").record(), "sha256:data")
    assert identity_changes(base, watched) == []
    changed = run_identity(settings("train.lr=0.01", "train.lora.rank=4").record(), "sha256:other")
    assert identity_changes(base, changed) == [
        "data.fingerprint: 'sha256:data' -> 'sha256:other'",
        "train.lora.rank: 8 -> 4",
        "train.lr: 0.005 -> 0.01",
    ]


def test_only_complete_checkpoints_count_and_a_commit_replaces_the_older(tmp_path):
    folder = CheckpointFolder(tmp_path / "checkpoints")
    assert folder.latest() is None
    first = folder.pending(5)
    first.mkdir(parents=True)
    (first / "adapter.safetensors").write_bytes(b"x")
    assert folder.latest() is None  # still being written
    folder.commit(first, 5, {"step": 5})
    half = folder.pending(10)  # a write killed before state.json
    half.mkdir()
    (half / "adapter.safetensors").write_bytes(b"partial")
    assert folder.latest().name == "step-000005"
    again = folder.pending(10)
    (again / "optimizer.pt").write_bytes(b"y")
    folder.commit(again, 10, {"step": 10})
    assert [p.name for p in folder.path.iterdir()] == ["step-000010"]
    assert json.loads((folder.latest() / STATE).read_text()) == {"step": 10}


def test_a_resume_against_changed_settings_is_refused_with_what_changed(tmp_path):
    root = tmp_path / "lora"
    identity = run_identity(settings().record(), "sha256:data")
    folders = prepare_run(str(root), "a", identity, resume=True, log_dir=None)
    assert folders.resume_step == 0 and folders.log_dir == run_folder(root, "a") / "tensorboard"
    pending = folders.checkpoints.pending(4)
    pending.mkdir(parents=True)
    folders.checkpoints.commit(pending, 4, {"step": 4, "identity": identity})
    assert prepare_run(str(root), "a", identity, resume=True, log_dir=None).resume_step == 4

    other = run_identity(settings("train.epochs=3").record(), "sha256:data")
    with pytest.raises(TrainConfigError) as info:
        prepare_run(str(root), "a", other, resume=True, log_dir=None)
    (problem,) = info.value.problems
    assert problem.startswith("train.resume: the checkpoint at step 4 in ")
    assert "(train.epochs: 8 -> 3)" in problem and "train.resume=false" in problem
    fresh = prepare_run(str(root), "a", other, resume=False, log_dir=None)
    assert fresh.resume_step == 0 and fresh.checkpoints.latest() is None


@pytest.mark.parametrize("overrides, expected", [
    (["train.keep=best"], "train.keep: needs validation during training; set train.eval_every (e.g. train.eval_every=10)"),
    (["train.early_stopping_patience=2"],
     "train.early_stopping_patience: needs validation during training; set train.eval_every (e.g. train.eval_every=10)"),
    (["train.eval_every=5", "data.validation_fraction=0"],
     "train.eval_every: there are no validation rows; set data.validation_fraction (e.g. data.validation_fraction=0.1) "
     "or train.eval_every=null"),
    (["train.keep=first", "train.eval_every=5"], "train.keep: last or best (got 'first')"),
    (["train.report_to=wandb"], "train.report_to: tensorboard, mlflow or none (got 'wandb')"),
    (["train.save_every=0"], "train.save_every: must be an integer >= 1 or null (got 0)"),
])
def test_progress_settings_name_the_setting_and_the_fix(overrides, expected):
    with pytest.raises(TrainConfigError) as info:
        settings(*overrides)
    assert info.value.problems == [expected]
