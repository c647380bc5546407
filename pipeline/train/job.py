"""The LoRA training job: chat conversations -> a PEFT LoRA adapter in the registry.

    settings (`settings.TrainSettings`) -> rows -> conversations (`data`)
      -> render with the model's chat template, tokenize, labels on assistant tokens only (`labels`)
      -> train in-process (`loop`), or with Ray Train's TorchTrainer and DDP over `train.workers`
         (`ray_train`)
      -> adapter files + manifest.json into a registry staging folder, renamed into place

A run that fails or is killed leaves no adapter behind (see `pipeline.lora_registry`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.manifests import iso_time, package_versions
from pipeline.lora_compat import check_adapter_matches
from pipeline.lora_registry import MANIFEST, AdapterRegistry
from pipeline.model_settings import ModelSettings
from pipeline.train.checkpoints import RUNS_FOLDER, prepare_run, run_identity
from pipeline.train.data import (
    DataError,
    conversations_from_rows,
    data_columns,
    data_fingerprint,
    read_rows,
    split_validation,
)
from pipeline.train.labels import prepare_examples
from pipeline.train.loop import FitJob, fit
from pipeline.train.settings import TrainConfigError, TrainSettings, base_model_name_or_path, training_model_path

log = logging.getLogger("pipeline.train.job")

# Recorded in the manifest: what the adapter's numbers depend on.
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "ray", "tokenizers", "pyarrow", "datasets", "hydra-core")


def run(cfg) -> dict:
    """Train the adapter described by `cfg` (the composed Hydra config); return its manifest."""
    settings = TrainSettings.from_config(cfg)
    started = time.time()
    registry = AdapterRegistry(settings.lora_root)
    name, overwrite = settings.adapter.name, settings.adapter.overwrite
    registry.check_can_write(name, overwrite)  # refuse before the data and model are loaded

    data, train, model = settings.data, settings.train, settings.model
    if train.use_gpu and train.workers == 1:
        import torch

        if not torch.cuda.is_available():
            raise TrainConfigError(["train.use_gpu: true, but torch sees no CUDA GPU here (train.use_gpu=false trains on the CPU)"])
    train_path = training_model_path(model)
    rows = read_rows(data.path, data_columns(data), split=data.split, config_name=data.config_name)
    if data.max_rows:
        rows = rows[: data.max_rows]
    convs, skipped = conversations_from_rows(rows, data)
    if not convs:
        raise DataError(f"no usable conversation in {len(rows)} rows of {list(data.path)} (skipped: {dict(skipped)})")
    train_idx, val_idx = split_validation(len(convs), data.validation_fraction, train.seed)
    examples, dropped, pad_id = prepare_examples(convs, train_path, settings.prompt.date_string, train.max_seq_len)
    skipped.update(dropped)
    train_ex = [examples[i] for i in train_idx if examples[i] is not None]
    val_ex = [examples[i] for i in val_idx if examples[i] is not None]
    if not train_ex:
        raise DataError(f"no trainable example left (skipped: {dict(skipped)})")
    log.info(
        "data: %d rows -> %d conversations (%d train, %d validation)%s",
        len(rows), len(convs), len(train_ex), len(val_ex),
        f"; skipped {dict(skipped)}" if skipped else "",
    )

    if train.eval_every and not val_ex:
        raise TrainConfigError([
            f"train.eval_every: no validation rows ({len(convs)} conversations, data.validation_fraction="
            f"{data.validation_fraction}); raise data.validation_fraction or set train.eval_every=null"])

    fingerprint = data_fingerprint(convs)
    identity = run_identity(settings.record(), fingerprint)
    folders = prepare_run(str(registry.work_root), name, identity, train.resume, train.log_dir)
    job = FitJob(train=train, model_path=train_path, base_model_name_or_path=base_model_name_or_path(model),
                 pad_id=pad_id, checkpoint_dir=str(folders.checkpoints.path),
                 identity=identity, log_dir=str(folders.log_dir), run_name=name,
                 mlflow_uri=mlflow_uri(settings, registry) if train.report_to == "mlflow" else None)
    with registry.staging(name, overwrite=overwrite) as staging:
        if train.workers > 1:
            from pipeline.train.ray_train import fit_with_ray

            metrics = fit_with_ray(job, train_ex, val_ex, staging, settings.ray)
        else:
            metrics = fit(job, train_ex, val_ex, out_dir=staging)
        match = _check_served_model(staging, model, train_path)
        manifest = {
            "adapter": name,
            "base_model": {"name": model.name, "path": model.path, "train_path": train_path},
            "data": {
                "path": list(data.path),
                "fingerprint": fingerprint,
                "rows": len(rows),
                "conversations": len(convs),
                "train_examples": len(train_ex),
                "validation_examples": len(val_ex),
                "skipped": dict(skipped),
            },
            "config": settings.record(),
            # The date the chat template was rendered with: generation refuses the adapter under
            # another, since the system header it learned after would differ.
            "prompt": {"date_string": settings.prompt.date_string},
            **metrics,
            "tensorboard": str(folders.log_dir) if train.report_to == "tensorboard" else None,
            "mlflow": {"uri": job.mlflow_uri, "experiment": name} if train.report_to == "mlflow" else None,
            "served_model_check": match,
            "created": iso_time(time.time()),
            "wall_seconds": round(time.time() - started, 3),
            "versions": package_versions(VERSIONED_PACKAGES, python=True),
        }
        report = _write_report(staging, manifest)
        # Written last: its presence is what makes the folder an adapter.
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    folders.checkpoints.discard()  # the adapter is published: nothing left to resume
    adapter = registry.resolve(name)
    where = adapter.uri or str(adapter.path)
    print(_summary(name, where, registry.shown, manifest) + (f"\n  report: {adapter.path / report}" if report else ""),
          file=sys.stderr)
    return manifest


def mlflow_uri(settings: TrainSettings, registry: AdapterRegistry | None = None) -> str:
    """Where report_to=mlflow logs: `train.mlflow_uri`, or a file store beside the registry's runs
    (for a registry on an object store: in this node's cache, `AdapterRegistry.work_root`)."""
    root = registry.work_root if registry is not None else Path(settings.lora_root)
    return settings.train.mlflow_uri or Path(root, RUNS_FOLDER, "mlflow").resolve().as_uri()


def _write_report(folder: Path, manifest: dict) -> str | None:
    """The run's report page (its file name); the adapter is complete without it, so a failure
    only warns."""
    from pipeline.train.report import REPORT, write_report

    try:
        write_report(folder, manifest)
        return REPORT
    except Exception as exc:
        log.info("the report failed:", exc_info=True)
        log.warning("the report could not be written (%s: %s)", type(exc).__name__, exc)
        return None


def _check_served_model(adapter_dir: Path, model: ModelSettings, train_path: str) -> dict | None:
    """When the served checkpoint differs from the trained one (AWQ vs float), make sure every
    LoRA target exists there too: vLLM would otherwise refuse the adapter at generation time,
    long after training. Reads only the checkpoint's weight names (a local folder, or the
    index file of a hub model)."""
    from pipeline.model_files import resolve_model_file

    served = model.path
    if not served or os.path.abspath(served) == os.path.abspath(train_path):
        return None
    try:
        model_dir = served if Path(served).is_dir() else resolve_model_file(served, "model.safetensors.index.json").parent
        m = check_adapter_matches(adapter_dir, model_dir)
    except FileNotFoundError as exc:
        log.warning("could not check the adapter against the served model %s: %s", served, exc)
        return {"model": served, "checked": False, "reason": str(exc)}
    if not m.ok:
        raise TrainConfigError([
            f"train.lora.target_modules: {list(m.missing)} do not exist in the served model {served}; "
            "name modules that both checkpoints have"
        ])
    return {"model": served, "checked": True, "matched_modules": m.matched_modules}


def _summary(name: str, path: str, root: str, m: dict) -> str:
    val = m.get("validation_loss")
    return (
        f"adapter {name!r} -> {path}\n"
        f"  {m['steps']} steps, {m['epochs_run']:.2f} epochs, {m['train_tokens']} tokens "
        f"({m['tokens_per_second']:.0f} tokens/s over {m['train_seconds']:.1f}s, {m['workers']} worker(s))\n"
        f"  final train loss {m['train_loss']:.4f}"
        + (f", validation loss {val:.4f}" if val is not None else "")
        + f"\n  use it: a request row with lora={name!r}; list: python -m pipeline.lora_registry --root {root}"
    )
